"""The FastAPI app: routes, admission (draining, API key), engine loading in the background."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from server import __version__
from server.chat import create_chat_completion
from server.completions import create_completion
from server.errors import APIError, bad_request, install_error_handlers
from server.generation import off_loop
from server.lora_routes import adapter_cards, add_lora_routes
from server.openapi import ERROR_RESPONSES, HEALTH_RESPONSES, METRICS_RESPONSES, STREAM_RESPONSES, openapi_schema
from server.playground import PLAYGROUND_PATHS, add_playground
from server.prompts import encode, render_chat, template_arguments
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.protocol_responses import ResponseObject, ResponsesRequest
from server.responses import create_response
from server.state import ServerSettings, ServerState
from server.tool_calls import template_messages, with_tools

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


# No API key needed (they take no input). The playground's stay open when it is off: a 404 then, not a 401.
OPEN_PATHS = ("/health", "/version", "/metrics", "/openapi.json", "/docs", "/redoc", *PLAYGROUND_PATHS)


class AdmissionMiddleware:
    """Runs before routing: 503 for everything but /metrics while draining, 401 without the API key on
    every route that takes input, 413 for a body over the size limit. Counts requests in flight (the
    drain waits for them)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope)
        if error is None:
            receive, error = await self._bounded_body(scope, receive)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        self.state.requests_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.requests_in_flight -= 1

    def _refusal(self, scope: Scope) -> APIError | None:
        path = scope["path"]
        if self.state.draining and path != "/metrics":
            return APIError(503, "The server is shutting down and accepts no new requests.")
        key = self.state.settings.api_key
        if key and path not in OPEN_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "Invalid or missing API key: send it as 'Authorization: Bearer <key>'.",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _bounded_body(self, scope: Scope, receive: Receive) -> tuple[Receive, APIError | None]:
        """413 before reading a body declared too large; a chunked body is read here up to the limit."""
        limit = self.state.settings.max_request_body_bytes
        too_large = APIError(413, f"The request body is larger than this server accepts ({limit} bytes).")
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            return receive, (too_large if not length.isdigit() or int(length) > limit else None)
        if scope["method"] in ("GET", "HEAD"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return receive, too_large
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying() -> Message:
            return replay.pop() if replay else await receive()

        return replaying, None


def tokenizer_decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)  # ids the tokenizer lacks decode to nothing


def _check_tokenizer(engine: AsyncEngine) -> None:
    """The HTTP API speaks text: it needs a tokenizer, and chat needs a template (a generic one if none)."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("the model directory has no tokenizer.json; pass one with --tokenizer DIR")
    if tokenizer.chat_template is None:
        logger.warning("the tokenizer has no chat template: /v1/chat/completions uses a generic ChatML "
                       "template; pass the model's own with --chat-template FILE")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


async def _load(state: ServerState, load_engine: Callable[[], AsyncEngine]) -> None:
    # A thread, so that /health can answer 503 while the weights load.
    try:
        engine = await asyncio.to_thread(load_engine)
        _check_tokenizer(engine)
    except Exception as e:
        logger.exception("failed to load the model")
        state.load_error = e
        return
    engine.start()
    state.engine = engine
    logger.info("model loaded: serving %s (max_model_len %d)",
                ", ".join(state.settings.served_model_names), engine.max_model_len)


def create_app(settings: ServerSettings, load_engine: Callable[[], AsyncEngine]) -> FastAPI:
    """`load_engine` runs in a worker thread at start-up; until it returns, /health answers 503."""
    state = ServerState(settings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state, load_engine))
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.engine is not None:
                await state.engine.shutdown()

    app = FastAPI(title="falcon-serve", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(AdmissionMiddleware, state=state)
    if settings.playground:
        add_playground(app)

    @app.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
    async def health() -> Response:
        reason = state.unavailable_reason()
        if reason is not None:
            return APIError(503, reason).response()
        return Response(status_code=200)

    @app.get("/version", responses=ERROR_RESPONSES)
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        engine = state.ready_engine()
        return ModelList(data=[
            ModelCard(id=name, created=created, root=settings.model_path, max_model_len=engine.max_model_len)
            for name in settings.served_model_names
        ] + adapter_cards(state, created, engine.max_model_len))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=STREAM_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post("/v1/responses", response_model=ResponseObject, responses=STREAM_RESPONSES)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(body, request, state)

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state.check_model(body.model)
        engine = state.ready_engine()
        tokenizer = engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages")
        if body.messages is not None:
            template_kwargs = with_tools(template_arguments(settings, body.chat_template, body.chat_template_kwargs),
                                         body.tools)
            text = await render_chat(tokenizer, template_messages(body.messages), body.add_generation_prompt,
                                     template_kwargs)
            add_special_tokens = bool(body.add_special_tokens)  # chat templates carry their own
        else:
            text = body.prompt or ""
            add_special_tokens = body.add_special_tokens is not False
        ids = await encode(tokenizer, text, add_special_tokens)
        return TokenizeResponse(
            count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
            token_strs=[tokenizer.id_to_token(i) or "" for i in ids] if body.return_token_strs else None)

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state.check_model(body.model)
        engine = state.ready_engine()
        vocab = engine.engine.model_config.vocab_size  # the model's: it may exceed the tokenizer's
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids out of range [0, {vocab}): {bad[:10]}", "tokens")
        text = await off_loop(tokenizer_decode, engine.tokenizer, body.tokens)
        return DetokenizeResponse(prompt=text)

    if settings.runtime_lora_updating:
        add_lora_routes(app, state)
    app.openapi = functools.partial(openapi_schema, app)
    return app
