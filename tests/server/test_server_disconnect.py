"""A client that goes away (streaming or not) aborts its request and frees its engine resources."""

from __future__ import annotations

import threading
import time

import httpx

LONG = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}


def wait_running(server, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("falcon_serve:num_requests_running") != count:
        assert time.monotonic() < deadline, f"expected {count} running requests"
        time.sleep(0.02)


def test_streaming_disconnect_aborts(server) -> None:
    server.wait_idle()
    aborts = server.metric("falcon_serve:request_success_total", finished_reason="abort")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "go"}], "stream": True, **LONG}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.metric("falcon_serve:num_requests_running") == 1
        # leaving the block closes the connection mid-stream
    server.wait_idle(timeout=5)
    assert server.metric("falcon_serve:request_success_total", finished_reason="abort") == aborts + 1
    assert server.metric("falcon_serve:kv_cache_usage_perc") == 0
    assert server.metric("falcon_serve:state_slots_usage_perc") == 0


def test_non_streaming_disconnect_aborts(server) -> None:
    server.wait_idle()
    aborts = server.metric("falcon_serve:request_success_total", finished_reason="abort")

    def abandoned_request() -> None:
        try:
            httpx.post(server.url + "/v1/completions", json={"prompt": "go", "n": 2, **LONG}, timeout=0.5)
        except httpx.TimeoutException:
            pass

    thread = threading.Thread(target=abandoned_request)
    thread.start()
    wait_running(server, 1)  # one request (of two samples)
    thread.join()
    server.wait_idle(timeout=5)
    assert server.metric("falcon_serve:request_success_total", finished_reason="abort") == aborts + 2
    # and the server still answers
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3})
    assert r.status_code == 200
