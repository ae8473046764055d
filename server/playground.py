"""The built-in playground: one static page (server/static/) at `/` and `/playground`.

Its paths need no API key (they take no input); the page asks for the key and sends it with every
API call. A strict Content-Security-Policy allows only the page's own script, style and
same-origin fetches, so even a bug that put model output into the DOM as HTML could not run it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css", "favicon.svg": "image/svg+xml"}
PAGE_PATHS = ("/", "/playground")
PLAYGROUND_PATHS = (*PAGE_PATHS, *(f"/static/{name}" for name in ASSETS))
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_playground(app: FastAPI) -> None:
    """GET / and /playground: the page; /static/<asset>: its script, style and icon."""

    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "playground.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    for path in PAGE_PATHS:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    for name, media_type in ASSETS.items():
        app.add_api_route(f"/static/{name}", _asset(name, media_type), methods=["GET"], include_in_schema=False)


def _asset(name: str, media_type: str):
    async def asset() -> FileResponse:
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return asset
