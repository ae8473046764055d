"""What a hostile or careless client sends cannot hurt another client, stall the server or get past the
API key: each finding of the hardening review, through the real server."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.test_server_errors import assert_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
INNOCENT = {"prompt": "innocent", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_hostile_sampling_values_do_not_touch_an_innocent_request(server) -> None:
    solo = httpx.post(server.url + COMPLETIONS, json=INNOCENT).json()["choices"][0]["text"]
    hostile = [
        ({"top_k": 2**64}, 200),  # more than the vocabulary keeps everything
        ({"top_k": 2**64, "temperature": 1.0, "seed": 2**64 - 1, "n": 2}, 200),
        ({"stop_token_ids": [-1000], "min_tokens": 1}, 400),
        ({"stop_token_ids": [-1], "min_tokens": 1}, 400),
        ({"stop_token_ids": [10**30]}, 400),
        ({"logit_bias": {"-5": 1}}, 400),
        ({"seed": 2**64}, 400),
        ({"temperature": 1e-45}, 200),
        ({"n": 8589934592}, 400),
    ]
    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(httpx.post, server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 8, **body},
                           timeout=60) for body, _ in hostile]
        good = [pool.submit(httpx.post, server.url + COMPLETIONS, json=INNOCENT, timeout=60) for _ in range(4)]
    for (body, status), r in zip(hostile, bad):
        assert r.result().status_code == status, (body, r.result().text)
    for r in good:
        assert r.result().status_code == 200 and r.result().json()["choices"][0]["text"] == solo
    server.assert_released()


def test_a_vanishing_temperature_is_greedy(server) -> None:
    greedy = httpx.post(server.url + COMPLETIONS, json=INNOCENT).json()["choices"][0]["text"]
    r = httpx.post(server.url + COMPLETIONS, json={**INNOCENT, "temperature": 1e-45})
    assert r.json()["choices"][0]["text"] == greedy


def test_loose_types_are_refused(server) -> None:
    for body, param in (({"n": "2"}, "n"), ({"stream": "yes"}, "stream"), ({"logprobs": True}, "logprobs"),
                        ({"max_tokens": 2.0}, "max_tokens"), ({"temperature": "0.5"}, "temperature"),
                        ({"n": True}, "n"), ({"echo": 1}, "echo")):
        assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": "x", **body}), 400, param)
    assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": [[False]]}), 400, "prompt")
    assert_error(httpx.post(server.url + CHAT, json={"messages": USER, "logprobs": 1}), 400, "logprobs")


def test_invalid_text_is_a_400_and_the_connection_stays_usable(server) -> None:
    lone = b'"\\ud800 alone"'
    bodies = [
        (COMPLETIONS, b'{"prompt": ' + lone + b"}", "prompt"),
        (CHAT, b'{"messages": [{"role": "user", "content": ' + lone + b"}]}", "messages[0].content"),
        ("/tokenize", b'{"prompt": ' + lone + b"}", "prompt"),
        (COMPLETIONS, b'{"prompt": "\xff\xfe not utf-8"}', None),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as http:  # one keep-alive connection for all
        for path, body, where in bodies:
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            error = assert_error(r, 400)
            if where:
                assert where in error["message"]
        assert http.post(COMPLETIONS, json={"prompt": "fine", "max_tokens": 1}).status_code == 200


def test_client_chat_templates_need_the_operators_consent(server, start_server) -> None:
    evil = "{% for a in range(10**6) %}{% for b in range(10**6) %}x{% endfor %}{% endfor %}"
    for path, extra in ((CHAT, {}), ("/tokenize", {})):
        for body in ({"chat_template": evil}, {"chat_template_kwargs": {"chat_template": evil}}):
            r = httpx.post(server.url + path, json={"messages": USER, **body, **extra})
            assert_error(r, 400, contains="--trust-request-chat-template")
    assert_error(httpx.post(server.url + CHAT, json={"messages": USER, "chat_template_kwargs": {"messages": []}}),
                 400, "chat_template_kwargs")
    trusting = start_server(settings={"trust_request_chat_template": True})
    own = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    r = httpx.post(trusting.url + "/tokenize", json={"messages": USER, "chat_template": own})
    assert r.status_code == 200
    text = httpx.post(trusting.url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text == "<<hi>>"
    trusting.stop()


def test_the_api_key_guards_every_input_route(start_server) -> None:
    live = start_server(api_key="sesame")
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}),
                       (COMPLETIONS, {"prompt": "x"}), ("/v1/no-such-route", {})):
        assert_error(httpx.post(live.url + path, json=body), 401)
    for path in ("/health", "/version", "/metrics", "/openapi.json"):
        assert httpx.get(live.url + path).status_code == 200
    auth = {"Authorization": "Bearer sesame"}
    assert httpx.post(live.url + "/tokenize", json={"prompt": "x"}, headers=auth).status_code == 200
    live.stop()


def test_tokenizing_a_huge_prompt_does_not_hold_the_event_loop(server) -> None:
    """A few MB of prompt take seconds to tokenize; meanwhile /health still answers (it completes before
    the big request does), and the big request is a 400 with the numbers."""
    big = {"prompt": "many words here " * 400_000, "max_tokens": 1}  # 6.4 MB
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.setdefault("big", httpx.post(
        server.url + COMPLETIONS, json=big, timeout=300)))
    worker.start()
    time.sleep(0.3)  # the big body is uploaded and being tokenized
    assert httpx.get(server.url + "/health", timeout=300).status_code == 200
    health_done_first = "big" not in result
    worker.join()
    assert health_done_first
    assert_error(result["big"], 400, "prompt", contains="maximum context length")


def test_request_bodies_have_a_size_limit(start_server) -> None:
    live = start_server(settings={"max_request_body_bytes": 4096})
    assert_error(httpx.post(live.url + COMPLETIONS, json={"prompt": "x" * 5000}), 413)

    def chunked():  # no Content-Length: the limit applies while the body is read
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(live.url + COMPLETIONS, content=chunked(), headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    assert httpx.post(live.url + COMPLETIONS, json={"prompt": "small", "max_tokens": 1}).status_code == 200
    live.stop()


def test_slow_headers_are_cut_off(start_server) -> None:
    live = start_server(header_timeout=1.0)
    host, port = live.url.removeprefix("http://").split(":")
    loris = socket.create_connection((host, int(port)))
    loris.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    loris.settimeout(30)
    assert loris.recv(1024) == b""  # closed by the server
    loris.close()
    assert httpx.get(live.url + "/health").status_code == 200
    live.stop()


def test_the_queue_limit_holds_under_a_burst_and_counts_prompts_times_n(start_server) -> None:
    live = start_server(max_queue_len=2, max_num_seqs=1)
    body = {"prompt": "burst", "max_tokens": 600, "ignore_eos": True}  # long enough to outlast the burst
    with ThreadPoolExecutor(10) as pool:
        responses = [r.result() for r in [pool.submit(httpx.post, live.url + COMPLETIONS, json=body, timeout=120)
                                          for _ in range(10)]]
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) <= 3, codes  # 1 running + 2 waiting at most
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)
    # One request of 3 prompts (or n=3) is 3 sequences: more than the queue ever holds.
    assert_error(httpx.post(live.url + COMPLETIONS, json={**body, "prompt": ["a", "b", "c"]}), 400, "n")
    assert_error(httpx.post(live.url + COMPLETIONS, json={**body, "n": 3}), 400, "n")
    two = httpx.post(live.url + COMPLETIONS, json={**body, "prompt": ["a", "b"], "max_tokens": 4}, timeout=120)
    assert two.status_code == 200
    live.assert_released()
    live.stop()


def test_detokenize_takes_every_id_of_the_model(start_server, h1_dir) -> None:
    """The tiny model has 300 embedding rows but its tokenizer 261 tokens: ids in between are valid."""
    live = start_server(model=str(h1_dir), max_model_len=512)
    assert live.state.engine.tokenizer.vocab_size < 299
    r = httpx.post(live.url + "/detokenize", json={"tokens": [70, 299]})
    assert r.status_code == 200
    assert_error(httpx.post(live.url + "/detokenize", json={"tokens": [300]}), 400, "tokens")
    live.stop()


def test_running_counts_requests_not_samples(server) -> None:
    server.wait_idle()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", COMPLETIONS, json={"prompt": "go", "n": 3, "max_tokens": 2000, "ignore_eos": True,
                                                    "stream": True}) as r:
            lines = r.iter_lines()  # keep a reference: dropping the iterator closes the connection
            next(lines)
            deadline = time.monotonic() + 10
            while len(server.state.engine.engine.scheduler.running) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert server.metric("falcon_serve:num_requests_running") == 1
    server.assert_released()


def test_openapi_describes_what_the_server_returns(server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"400", "401", "404", "413", "429", "503"} <= set(responses), path
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/event-stream" in spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert "text/plain" in next(iter(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))
    assert set(spec["paths"]["/health"]["get"]["responses"]) == {"200", "503"}


@pytest.mark.parametrize("n", [2, 3])
def test_forked_seeded_requests_near_the_seed_limit(server, n: int) -> None:
    r = httpx.post(server.url + CHAT, json={"messages": USER, "n": n, "seed": 2**64 - 1, "max_tokens": 4,
                                             "temperature": 1.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == n
    server.assert_released()
    assert httpx.get(server.url + "/health").status_code == 200
