"""The OpenAPI document at /openapi.json, describing what the server really returns.

FastAPI declares a 422 for every body it validates; this server answers 400 in OpenAI's error shape
instead (server.errors), so the 422s are replaced by the error responses each route can give.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.protocol import ErrorResponse


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: a value is missing, of the wrong type or out of range."),
    401: _error("Missing or wrong API key (only when the server runs with --api-key)."),
    404: _error("Unknown model or path."),
    413: _error("The request body is larger than --max-request-body-bytes."),
    429: _error("The queue is full (--max-queue-len); retry after the Retry-After header's seconds."),
    503: _error("The model is loading, the engine has stopped, or the server is shutting down."),
}
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The response, or with stream=true server-sent events (`data: {chunk}` ... "
                         "`data: [DONE]`).",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **ERROR_RESPONSES,
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready to serve (empty body).", "content": {}},
    503: _error("Not ready: loading, engine stopped (the message says why) or shutting down."),
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format.",
          "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}},
}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
