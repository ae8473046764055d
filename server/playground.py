"""The built-in playground: one static page (server/static/) at `/` and `/playground`.

It is served without the API key (it is not an input route); the page asks for the key and sends
it with every API call. A strict Content-Security-Policy allows only the page's own script, style
and same-origin fetches, so even a bug that put model output into the DOM as HTML could not run it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_playground(app: FastAPI) -> None:
    """GET / and /playground: the page; /static/*: its script and style."""

    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "playground.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    for path in ("/", "/playground"):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
