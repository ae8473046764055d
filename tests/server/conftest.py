"""Real servers on loopback: uvicorn in a background thread, the real AsyncEngine on CPU, and a tiny
random Falcon-H1 built by server/demo.py (seed 1, so it is not the cached demo model itself)."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineArgs
from server.app import create_app
from server.demo import build_demo_checkpoint
from server.runner import DrainingServer, make_server
from server.state import ServerSettings

MODEL_NAME = "tiny-falcon"
MAX_MODEL_LEN = 2048


class LiveServer:
    """One app served by uvicorn in a thread, on a loopback port chosen up front."""

    def __init__(self, app, shutdown_timeout: int = 5, header_timeout: float = 10.0) -> None:
        self.app = app
        self.server: DrainingServer = make_server(app, "127.0.0.1", 0, log_level="warning",
                                                  shutdown_timeout=shutdown_timeout, header_timeout=header_timeout)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def start(self, ready: bool = True) -> LiveServer:
        self.thread.start()
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.state.load_error is None, f"model failed to load: {self.state.load_error!r}"
            assert time.monotonic() < deadline, "the server did not get ready in time"
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.ConnectError:  # uvicorn is not listening yet
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics, e.g. metric("falcon_serve:request_success_total", finished_reason="abort")."""
        text = httpx.get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise KeyError(f"{name} {labels} not in /metrics")

    def assert_released(self, timeout: float = 10) -> None:
        """Idle, and everything any request held is back: slots, blocks, engine and stream bookkeeping."""
        self.wait_idle(timeout)
        deadline = time.monotonic() + timeout
        engine = self.state.engine
        while engine._routes or engine.engine.sequences:
            assert time.monotonic() < deadline, "requests still tracked by the engine"
            time.sleep(0.05)
        cache = engine.engine.cache
        assert cache.num_free_slots == cache.slots.capacity and cache.num_free_blocks == cache.blocks.capacity
        assert all(refs == 0 for refs in cache.block_refs) and engine.num_queued_samples == 0

    def wait_idle(self, timeout: float = 10) -> None:
        """Until the engine runs and queues nothing (as /metrics reports it)."""
        deadline = time.monotonic() + timeout
        while (self.metric("falcon_serve:num_requests_running")
               or self.metric("falcon_serve:num_requests_waiting")):
            assert time.monotonic() < deadline, "requests still running"
            time.sleep(0.05)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("tiny-falcon"), seed=1)


def engine_loader(checkpoint: Path, **overrides) -> Callable:
    def load():
        from engine.async_engine import AsyncEngine

        args = dict(model=str(checkpoint), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN,
                    max_num_seqs=32)
        return AsyncEngine.from_engine_args(EngineArgs(**{**args, **overrides}))

    return load


@pytest.fixture(scope="session")
def loader(checkpoint: Path) -> Callable[..., Callable]:
    """loader(**engine_overrides) -> a load_engine function for create_app."""
    return functools.partial(engine_loader, checkpoint)


@pytest.fixture(scope="session")
def start_server(checkpoint: Path) -> Iterator[Callable[..., LiveServer]]:
    """start_server(api_key=..., max_queue_len=..., settings=dict(...), engine overrides...) -> a ready
    LiveServer; `settings` holds further ServerSettings fields."""
    started: list[LiveServer] = []

    def start(*, api_key: str | None = None, max_queue_len: int | None = None, ready: bool = True,
              load: Callable | None = None, settings: dict | None = None, header_timeout: float = 10.0,
              **engine_overrides) -> LiveServer:
        server_settings = ServerSettings(served_model_names=[MODEL_NAME, "alias"], model_path=str(checkpoint),
                                         api_key=api_key, max_queue_len=max_queue_len, **(settings or {}))
        live = LiveServer(create_app(server_settings, load or engine_loader(checkpoint, **engine_overrides)),
                          header_timeout=header_timeout)
        started.append(live)
        return live.start(ready=ready)

    yield start
    for live in started:
        if live.thread.is_alive():
            live.stop()


@pytest.fixture(scope="session")
def server(start_server) -> LiveServer:
    """The shared server: no API key, no queue limit, max_model_len 2048, 32 sequences."""
    return start_server()


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def async_client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tool_server(start_server) -> LiveServer:
    """A server that parses Hermes tool calls and allows tool_choice "auto" (one per test module)."""
    return start_server(settings=dict(tool_call_parser="hermes", enable_auto_tool_choice=True))


@pytest.fixture
def tc(tool_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
