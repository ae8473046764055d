"""Who gets in: API key, queue limit (429), loading and failed engines (503), draining (503)."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import openai
import pytest

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_api_key(start_server) -> None:
    live = start_server(api_key="sesame")
    for path in ("/v1/models", "/v1/chat/completions"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = httpx.request("GET" if path.endswith("models") else "POST", live.url + path, json=CHAT,
                              headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # malformed JSON without a key is still a 401: auth comes first
    assert httpx.post(live.url + "/v1/completions", content=b"{").status_code == 401
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(live.url + path).status_code == 200
    ok = openai.OpenAI(base_url=live.url + "/v1", api_key="sesame", max_retries=0)
    assert ok.chat.completions.create(model="tiny-falcon", **CHAT).choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
    live.stop()


def test_queue_full_is_429_with_retry_after(start_server) -> None:
    live = start_server(max_queue_len=1, max_num_seqs=1)
    long = {"prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30) as a, httpx.Client(base_url=live.url, timeout=30) as b:
        with a.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # keep a reference: dropping the iterator closes the connection
            next(lines)  # running now, holding the only sequence slot
            def wait_in_queue() -> None:
                with contextlib.suppress(httpx.HTTPError):  # cut off when the test closes its client
                    b.post("/v1/completions", json={**long, "stream": False})

            threading.Thread(target=wait_in_queue, daemon=True).start()
            deadline = time.monotonic() + 10
            while live.metric("falcon_serve:num_requests_waiting") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
    live.stop()  # cancels the abandoned waiting request


def test_loading_is_503_then_ready(start_server, loader) -> None:
    release = threading.Event()
    load = loader()

    def slow_load():
        release.wait(30)
        return load()

    live = start_server(load=slow_load, ready=False)
    for path in ("/health", "/v1/models"):
        r = httpx.get(live.url + path)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert httpx.post(live.url + "/v1/chat/completions", json=CHAT).status_code == 503
    assert httpx.get(live.url + "/metrics").status_code == 200  # scrapable while loading
    release.set()
    live.wait_ready()
    assert httpx.post(live.url + "/v1/chat/completions", json=CHAT).status_code == 200
    live.stop()


def test_failed_load_stops_the_server(start_server) -> None:
    def broken_load():
        raise RuntimeError("no such checkpoint")

    live = start_server(load=broken_load, ready=False)
    live.thread.join(timeout=10)
    assert not live.thread.is_alive()
    assert "no such checkpoint" in str(live.state.load_error)


def test_errored_engine_and_draining_refuse_work(server, monkeypatch) -> None:
    monkeypatch.setattr(server.state.engine, "_loop_error", "a test fault")  # as its loop sets it
    r = httpx.get(server.url + "/health")
    assert r.status_code == 503 and "a test fault" in r.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/chat/completions", json=CHAT).status_code == 503
    monkeypatch.undo()

    monkeypatch.setattr(server.state, "draining", True)
    for path in ("/health", "/v1/models", "/version"):
        r = httpx.get(server.url + path)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/metrics").status_code == 200
    monkeypatch.undo()
    assert httpx.get(server.url + "/health").status_code == 200
