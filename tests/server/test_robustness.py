"""The robustness suite: generated requests from the server's own OpenAPI document, a soak with clients
that leave mid-stream, an overload burst and a slow reader. Afterwards: no 5xx ever, nothing running or
waiting, every slot and block free."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_schema_fuzzing_finds_no_server_error(start_server, tmp_path) -> None:
    """schemathesis generates ~2,000 requests (valid and invalid) for every operation of /openapi.json."""
    live = start_server(max_queue_len=64, max_num_seqs=8, max_model_len=64)
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", live.url + "/openapi.json", "--checks",
         "not_a_server_error", "--max-examples", "150", "--generation-deterministic", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = [line for line in result.stdout.splitlines() if "generated" in line]
    assert generated and int(generated[-1].split()[0]) >= 1000, result.stdout[-2000:]
    assert httpx.get(live.url + "/health").status_code == 200
    live.assert_released(timeout=60)
    live.stop()


def test_soak_with_clients_leaving_mid_stream(start_server) -> None:
    live = start_server(max_num_seqs=6)
    rng = random.Random(0)
    statuses: list[int] = []

    def client(i: int) -> None:
        streaming, leaves = rng.random() < 0.6, rng.random() < 0.2
        body = {"max_tokens": rng.randrange(1, 60), "n": rng.choice([1, 1, 2]), "stream": streaming,
                "temperature": rng.choice([0, 0.8]), "seed": i}
        path = CHAT if i % 2 else COMPLETIONS
        prompt = {"messages": [{"role": "user", "content": f"soak {i}"}]} if path == CHAT else {"prompt": f"soak {i}"}
        body.update(prompt)
        with httpx.Client(base_url=live.url, timeout=120) as http:
            if not streaming:
                try:
                    statuses.append(http.post(path, json=body, timeout=0.05 if leaves else 120).status_code)
                except httpx.TimeoutException:
                    pass  # the client left before the answer
                return
            with http.stream("POST", path, json={**body, "ignore_eos": leaves, "max_tokens": 400 if leaves else
                                                 body["max_tokens"]}) as r:
                statuses.append(r.status_code)
                lines = r.iter_lines()
                for k, _ in enumerate(lines):
                    if leaves and k == 3:
                        break  # closing the stream mid-way disconnects

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(60)))
    assert statuses and set(statuses) == {200}
    live.assert_released(timeout=60)
    assert live.metric("falcon_serve:request_success_total", finished_reason="abort") > 0
    live.stop()


def test_overload_burst_is_429_not_5xx_and_recovers(start_server) -> None:
    live = start_server(max_num_seqs=2, max_queue_len=4)
    body = {"prompt": "burst", "max_tokens": 40, "ignore_eos": True}
    before = rss_bytes()
    with ThreadPoolExecutor(30) as pool:  # 10x what the engine runs and queues at once
        codes = list(pool.map(lambda _: httpx.post(live.url + COMPLETIONS, json=body, timeout=120).status_code,
                              range(60)))
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    assert rss_bytes() - before < 512 * 2**20  # memory stays bounded
    live.assert_released(timeout=60)
    assert httpx.post(live.url + COMPLETIONS, json=body, timeout=120).status_code == 200
    live.stop()


def test_a_slow_reader_does_not_stall_others(start_server) -> None:
    live = start_server()
    slow_done = threading.Event()

    def slow_reader() -> None:
        body = {"prompt": "slow", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=live.url, timeout=120) as http, http.stream("POST", COMPLETIONS, json=body) as r:
            for _ in r.iter_lines():
                time.sleep(0.02)
        slow_done.set()

    reader = threading.Thread(target=slow_reader)
    reader.start()
    time.sleep(0.5)
    for i in range(5):  # each finishes while the slow reader is still reading
        r = httpx.post(live.url + COMPLETIONS, json={"prompt": f"fast {i}", "max_tokens": 5}, timeout=120)
        assert r.status_code == 200
    assert not slow_done.is_set()
    reader.join()
    live.assert_released()
    live.stop()
