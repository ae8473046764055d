"""Server-sent events as OpenAI sends them: `data: <json>\n\n` ... `data: [DONE]\n\n`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import APIError
from server.generation import wait_for_disconnect

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel, exclude: set[str] | dict[str, Any] | None = None) -> str:
    return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"


async def _errors_in_band(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the headers are out, a failure can only be reported in the stream: an error event in
    OpenAI's shape, then [DONE] (what vLLM does too)."""
    try:
        async for item in events:
            yield item
    except APIError as e:
        yield event(e.body())
        yield DONE
    except Exception as e:
        logger.exception("a streamed request failed")
        yield event(APIError(500, f"Internal server error: {type(e).__name__}: {e}").body())
        yield DONE


class EventStreamResponse(StreamingResponse):
    """A streamed response that always notices a client disconnect and always cleans up.

    Starlette only listens for disconnects on old ASGI versions and otherwise learns of one from a
    failed write, which never comes while a request waits in the queue. Here we always listen (as the
    non-streamed path does, through `until_disconnected`), and
    `close` (which aborts the engine requests behind the stream) runs however the stream ends.
    """

    def __init__(self, events: AsyncIterator[str], close: Callable[[], None]) -> None:
        super().__init__(_errors_in_band(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await wait_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            self._close()
