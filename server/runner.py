"""uvicorn with a draining flag: on SIGTERM/SIGINT new requests get 503 while in-flight ones finish."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.state import ServerState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's own graceful shutdown (stop listening, wait for open requests up to
    `timeout_graceful_shutdown`, then cancel them) plus the app's draining flag, and an exit when
    the model fails to load (rather than serving 503 forever)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            logger.info("shutting down: finishing in-flight requests (up to %ss), refusing new ones",
                        self.config.timeout_graceful_shutdown)
        self.state.draining = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.state.load_error is not None:
            return True
        return await super().on_tick(counter)


def make_server(app: FastAPI, host: str, port: int, *, log_level: str = "info",
                shutdown_timeout: int = 30) -> DrainingServer:
    """`app` comes from `server.app.create_app`."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    return DrainingServer(config, app.state.server)
