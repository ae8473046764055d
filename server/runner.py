"""uvicorn with a graceful drain: on SIGTERM/SIGINT the listener stays open and answers 503 to new
requests while in-flight ones finish; then the server stops and the process exits 0.

uvicorn's own shutdown closes the listener at once (new connections are refused, which a load balancer
reads as a dead pod, not a draining one) and re-raises the signal afterwards (exit 143/130). Here the
signal only sets the draining flag; `on_tick` ends the main loop once nothing is in flight or the grace
period is over. At the deadline, streams still running get an error event and [DONE] (the engine fails
their requests) before the connections close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.state import ServerState

logger = logging.getLogger(__name__)

STREAM_FLUSH_S = 1.0  # at the drain deadline: time for streams to send their error event and [DONE]


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.should_exit = self.force_exit = True
            return
        logger.info("shutting down: finishing in-flight requests (up to %ss), refusing new ones with 503",
                    self.config.timeout_graceful_shutdown)
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.config.timeout_graceful_shutdown

    async def on_tick(self, counter: int) -> bool:
        if self.state.load_error is not None:
            return True
        if self.drain_deadline is not None and not self.should_exit:
            if self.state.requests_in_flight == 0:
                return True
            if time.monotonic() >= self.drain_deadline:
                logger.warning("grace period over: failing %d in-flight requests", self.state.requests_in_flight)
                if self.state.engine is not None:
                    await self.state.engine.shutdown()  # streams end with an error event and [DONE]
                await asyncio.sleep(STREAM_FLUSH_S)
                return True
        return await super().on_tick(counter)


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive within timeout_s
    (uvicorn has no such setting: a slow-loris client could otherwise hold connections open forever)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_epoch = 0  # which wait for headers the pending timer belongs to

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()  # the next request's headers get the same time

        def _arm_header_timer(self) -> None:
            self._header_epoch += 1
            self.loop.call_later(timeout_s, self._headers_overdue, self._header_epoch)

        def _headers_overdue(self, epoch: int) -> None:
            still_waiting = epoch == self._header_epoch and self.conn.their_state is h11.IDLE
            if still_waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def make_server(app: FastAPI, host: str, port: int, *, log_level: str = "info", shutdown_timeout: int = 30,
                header_timeout: float = 10.0) -> DrainingServer:
    """`app` comes from `server.app.create_app`."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=header_timeout_protocol(header_timeout), timeout_graceful_shutdown=shutdown_timeout)
    return DrainingServer(config, app.state.server)
