"""Tests for benchmarks/serve.py against a tiny in-process fake OpenAI-compatible streaming server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "serve.py"

_spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = bench
_spec.loader.exec_module(bench)

FIRST_DELAY = 0.05  # seconds before the first content chunk
CHUNK_SLEEP = 0.02  # seconds between content chunks
MODEL_ID = "fake-model"


class FakeState:
    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.__init__()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(state: FakeState) -> FastAPI:
    """Streams max_tokens one-token chunks; prompt words FAIL -> 500, NOUSAGE -> no usage, SLOW -> hang."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}, {"id": "other"}]}

    async def handle(request: Request, chat: bool) -> Any:
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        state.requests.append({"body": body, "auth": request.headers.get("authorization")})
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        n = int(body.get("max_tokens", 16))
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)

        def chunk(text: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
            return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}

        async def gen() -> AsyncIterator[str]:
            try:
                if chat:
                    yield sse(chunk(None, role=True))  # empty role delta: must not count as first token
                await asyncio.sleep(10 if "SLOW" in prompt else FIRST_DELAY)
                for i in range(n):
                    if i:
                        await asyncio.sleep(CHUNK_SLEEP)
                    yield sse(chunk(" tok"))
                if "NOUSAGE" not in prompt:
                    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                             "total_tokens": len(prompt.split()) + n}
                    yield sse({"choices": [], "usage": usage})
            finally:
                state.in_flight -= 1
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def server(fake_server: tuple[str, FakeState]) -> tuple[str, FakeState]:
    fake_server[1].reset()
    return fake_server


def run(argv: list[str]) -> dict[str, Any]:
    return asyncio.run(bench.run_benchmark(bench.parse_args(argv)))


def write_dataset(path: Path, prompts: list[str], answer: str = "one two three four five six seven") -> str:
    convs = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": answer}]}
             for p in prompts]
    path.write_text(json.dumps(convs))
    return str(path)


def test_help_smoke() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for flag in ("--base-url", "--endpoint", "--max-concurrency", "--request-rate", "--random-range-ratio",
                 "--dataset-path", "--ignore-eos", "--save-result", "--result-filename", "--timeout"):
        assert flag in out.stdout


def test_poisson_schedule_statistics() -> None:
    offsets = bench.arrival_offsets(5000, 20.0, random.Random(1))
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.06)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.08)  # exponential CV
    assert offsets == bench.arrival_offsets(5000, 20.0, random.Random(1))
    assert bench.arrival_offsets(4, float("inf"), random.Random(1)) == [0.0] * 4


def test_random_prompts_lengths() -> None:
    exact = bench.random_requests(10, 32, 7, 0.0, random.Random(0))
    assert all(len(s.prompt.split()) == 32 == s.prompt_len and s.output_len == 7 for s in exact)
    assert all(w in bench.VOCAB for s in exact for w in s.prompt.split())
    ranged = bench.random_requests(200, 100, 50, 0.5, random.Random(0))
    assert all(50 <= s.prompt_len <= 150 and 25 <= s.output_len <= 75 for s in ranged)
    assert len({s.prompt_len for s in ranged}) > 20


def test_sharegpt_parsing(tmp_path: Path) -> None:
    data = [
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hello there"},
                           {"from": "gpt", "value": " ".join(["w"] * 10)}, {"from": "human", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "no answer"}]},
        {"conversations": []},
        {"id": "missing-key"},
        {"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "y"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    specs = bench.sharegpt_requests(str(path), 6, random.Random(0))
    assert len(specs) == 6
    by_prompt = {s.prompt: s for s in specs}
    assert set(by_prompt) == {"hello there", "a b c"}
    assert by_prompt["hello there"].output_len == 13  # 10 words * 1.3
    assert by_prompt["a b c"].output_len == 1 and by_prompt["a b c"].prompt_len == 4
    path.write_text(json.dumps(data[1:4]))
    with pytest.raises(ValueError):
        bench.sharegpt_requests(str(path), 1, random.Random(0))


def test_percentile_and_metrics() -> None:
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    R = bench.RequestResult
    results = [R(success=True, ttft=0.1, latency=0.5, itl=[0.1] * 4, prompt_tokens=10, completion_tokens=5),
               R(success=True, ttft=0.3, latency=0.3, itl=[], prompt_tokens=6, completion_tokens=1),
               R(success=False, error="boom", prompt_tokens=99, completion_tokens=99)]
    m = bench.compute_metrics(results, 2.0, [99.0])
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (16, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert m["total_token_throughput"] == 11.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4; single-token request excluded
    assert m["mean_itl_ms"] == pytest.approx(100.0) and m["p99_itl_ms"] == pytest.approx(100.0)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_metrics(server: tuple[str, FakeState], endpoint: str) -> None:
    url, state = server
    r = run(["--base-url", url, "--endpoint", endpoint, "--num-prompts", "8", "--random-input-len", "16",
             "--random-output-len", "5", "--api-key", "sk-test"])
    assert (r["completed"], r["failed"]) == (8, 0)
    assert r["model_id"] == MODEL_ID
    assert r["total_output_tokens"] == 8 * 5
    assert r["total_input_tokens"] == 8 * 16  # from usage.prompt_tokens (fake counts words)
    for req in r["requests"]:
        assert req["success"] and req["ttft"] >= FIRST_DELAY
        assert len(req["itl"]) == 4 and req["generated_text"] == " tok" * 5
        assert req["latency"] >= req["ttft"] + 4 * CHUNK_SLEEP * 0.9
    assert CHUNK_SLEEP * 0.9 <= r["median_itl_ms"] / 1000 <= CHUNK_SLEEP * 4
    assert CHUNK_SLEEP * 0.9 <= r["mean_tpot_ms"] / 1000 <= CHUNK_SLEEP * 4
    assert r["mean_ttft_ms"] >= FIRST_DELAY * 1000 and r["p99_ttft_ms"] >= r["median_ttft_ms"]
    assert r["output_throughput"] == pytest.approx(40 / r["duration"])
    assert len(state.requests) == 8
    for seen in state.requests:
        body = seen["body"]
        assert seen["auth"] == "Bearer sk-test"
        assert body["model"] == MODEL_ID and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == 5
        assert ("messages" in body) == endpoint.endswith("chat/completions")


def test_max_concurrency_respected(server: tuple[str, FakeState]) -> None:
    url, state = server
    r = run(["--base-url", url, "--num-prompts", "12", "--max-concurrency", "3",
             "--random-input-len", "8", "--random-output-len", "3"])
    assert r["completed"] == 12 and r["max_concurrency"] == 3
    assert state.max_in_flight == 3
    state.reset()
    run(["--base-url", url, "--num-prompts", "12", "--random-input-len", "8", "--random-output-len", "3"])
    assert state.max_in_flight >= 8  # unlimited: (nearly) all at once


def test_request_rate_follows_schedule(server: tuple[str, FakeState]) -> None:
    url, _ = server
    args = ["--base-url", url, "--num-prompts", "15", "--request-rate", "30", "--seed", "7",
            "--random-input-len", "8", "--random-output-len", "2", "--model", MODEL_ID]
    r = run(args)
    assert r["completed"] == 15 and r["request_rate"] == 30.0
    rng = random.Random(7)  # same RNG draw order as run_benchmark: prompts first, then arrivals
    bench.random_requests(15, 8, 2, 0.0, rng)
    expected = bench.arrival_offsets(15, 30.0, rng)
    starts = [req["start_time"] for req in r["requests"]]
    for got, want in zip(starts, expected, strict=True):
        assert want - 0.005 <= got <= want + 0.15
    assert r["duration"] >= expected[-1]


def test_failures_dataset_and_fallback(server: tuple[str, FakeState], tmp_path: Path) -> None:
    url, state = server
    prompts = ["hello world", "please FAIL now", "tell me NOUSAGE story", "FAIL again", "last one"]
    ds = write_dataset(tmp_path / "ds.json", prompts)
    r = run(["--base-url", url, "--dataset", ds, "--num-prompts", "5"])
    assert (r["completed"], r["failed"]) == (3, 2)
    assert r["ignore_eos"] is False
    assert all("ignore_eos" not in s["body"] and s["body"]["max_tokens"] == 9 for s in state.requests)
    errors = [req["error"] for req in r["requests"] if not req["success"]]
    assert len(errors) == 2 and all("HTTP 500" in e and "injected failure" in e for e in errors)
    ok = [req for req in r["requests"] if req["success"]]
    assert r["total_output_tokens"] == 3 * 9  # 7 gpt words * 1.3 -> 9 tokens each
    nousage = next(req for req in ok if req["prompt_tokens"] == 5)  # fallback: estimate for 4 words
    assert nousage["completion_tokens"] == 9  # fallback: counted content chunks
    assert r["total_input_tokens"] == 2 + 5 + 2


def test_timeout_is_a_failure(server: tuple[str, FakeState], tmp_path: Path) -> None:
    url, _ = server
    ds = write_dataset(tmp_path / "slow.json", ["SLOW prompt", "quick prompt"])
    t0 = time.perf_counter()
    r = run(["--base-url", url, "--dataset-path", ds, "--num-prompts", "2", "--timeout", "0.5"])
    assert time.perf_counter() - t0 < 5
    assert (r["completed"], r["failed"]) == (1, 1)
    assert any(req["error"].startswith("TimeoutError") for req in r["requests"])


def test_main_result_file_and_exit_codes(server: tuple[str, FakeState], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    out = tmp_path / "result.json"
    rc = bench.main(["--base-url", url, "--endpoint", "/v1/chat/completions", "--num-prompts", "4",
                     "--random-input-len", "10", "--random-output-len", "3", "--result-filename", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for label in ("Successful requests:", "Failed requests:", "Benchmark duration (s):",
                  "Total generated tokens:", "Output token throughput (tok/s):", "Median TTFT (ms):",
                  "P99 TPOT (ms):", "Mean ITL (ms):"):
        assert label in printed
    saved = json.loads(out.read_text())
    assert saved["completed"] == 4 and saved["total_output_tokens"] == 12
    assert len(saved["requests"]) == 4 and all(len(q["itl"]) == 2 for q in saved["requests"])
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "request_throughput", "duration"):
        assert isinstance(saved[key], float)
    ds = write_dataset(tmp_path / "bad.json", ["FAIL a", "FAIL b"])
    assert bench.main(["--base-url", url, "--dataset-path", ds, "--num-prompts", "2"]) == 1
