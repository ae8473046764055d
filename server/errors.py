"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# OpenAI's `type` values; codes without an OpenAI equivalent fall back to HTTP's reason phrase.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A failure to report to the client; raised anywhere below a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> ErrorResponse:
        kind = _ERROR_TYPES.get(self.status, HTTPStatus(self.status).phrase.replace(" ", "_").lower())
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400; malformed JSON arrives here too (type json_invalid)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("The request body is not valid JSON.")
    # loc is ("body", field, ...). The locs' common prefix names the field a client knows, also when
    # a union reports one error per member (("body", "stop", "str"), ("body", "stop", "list[str]")).
    locs = [[str(part) for part in e.get("loc", ()) if part != "body"] for e in errors]
    common = locs[0] if locs else []
    for loc in locs[1:]:
        while loc[:len(common)] != common:
            common = common[:-1]
    param = ".".join(common) or None
    message = errors[0].get("msg", "Invalid request") if errors else "Invalid request"
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Routing errors (404 unknown path, 405 wrong method) in the same shape.
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}").response()
