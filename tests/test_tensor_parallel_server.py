"""`python -m server -tp 2` on the CPU: it serves the OpenAI SDK the text one process gives, a stop leaves
no process behind, the workers die with a killed server, and a killed worker turns /health into 503
with the reason."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.server.test_server_cli import Process

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
SERVE = ("--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
         "--tensor-parallel-size", "2")


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            pass
    return children + [d for c in children for d in descendants(c)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def assert_all_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)]


@pytest.fixture
def serve(h1_dir: Path, tmp_path: Path):
    started = []

    def start() -> tuple[Process, list[int]]:
        server = Process(tmp_path, "--model", str(h1_dir), *SERVE)
        started.append(server)
        server.wait_ready(timeout=180)
        workers = [pid for pid in descendants(server.proc.pid) if "spawn_main" in cmdline(pid)]
        assert len(workers) == 1, server.log.read_text()
        return server, workers

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_serves_like_one_process_and_stops_without_leftovers(serve, h1_dir: Path) -> None:
    expected = LLM(str(h1_dir), device="cpu", dtype="float32").generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0].outputs[0].text
    server, _ = serve()
    family = descendants(server.proc.pid)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    completion = client.completions.create(model=str(h1_dir), prompt=PROMPT, max_tokens=6, temperature=0)
    assert completion.choices[0].text == expected and completion.usage.completion_tokens == 6
    assert server.stop() == 0, server.log.read_text()
    assert_all_gone(family)


def test_a_killed_worker_makes_health_fail(serve) -> None:
    server, workers = serve()
    family = descendants(server.proc.pid)
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (health := httpx.get(server.url + "/health")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health.status_code == 503
    assert "tensor-parallel worker rank 1" in health.json()["error"]["message"]
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert refused.status_code == 503
    server.stop()
    assert_all_gone(family)


def test_workers_die_with_a_killed_server(serve) -> None:
    server, workers = serve()
    server.proc.kill()  # no shutdown, no closed pipes to read: the workers' watchdog sees the parent gone
    server.proc.wait()
    assert_all_gone(workers)
