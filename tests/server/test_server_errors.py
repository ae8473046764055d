"""Every client mistake is a 4xx in OpenAI's error shape; engine failures are 500s and the server lives on."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    assert contains in error["message"], error
    return error


BAD_REQUESTS = [
    # (path, body, status, param, message fragment)
    (CHAT, {}, 400, "messages", "Field required"),
    (CHAT, {"messages": "hi"}, 400, "messages", ""),
    (CHAT, {"messages": []}, 400, "messages", ""),
    (CHAT, {"messages": [{"content": "no role"}]}, 400, "messages.0.role", ""),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model", "gpt-4"),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature", "temperature"),
    (CHAT, {"messages": USER, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature", ""),
    (CHAT, {"messages": USER, "top_p": 0}, 400, "top_p", ""),
    (CHAT, {"messages": USER, "n": 0}, 400, "n", ""),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", ""),
    (CHAT, {"messages": USER, "max_tokens": 5000}, 400, "max_tokens", "2048"),
    (CHAT, {"messages": USER, "presence_penalty": 3}, 400, "presence_penalty", ""),
    (CHAT, {"messages": USER, "logit_bias": {"abc": 1}}, 400, "logit_bias", ""),
    (CHAT, {"messages": USER, "logit_bias": {"99999": 1}}, 400, None, "logit_bias"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", ""),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema", "json_schema"),
    # tool_choice defaults to "auto" with tools, which this server (no --enable-auto-tool-choice) refuses
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice",
     "--enable-auto-tool-choice"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice", ""),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages", "image_url"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 10}, 400, None, "2048"),
    (COMPLETIONS, {}, 400, "prompt", ""),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", ""),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty"),
    (COMPLETIONS, {"prompt": [1, 2, 999999]}, 400, None, "999999"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", ""),
    (COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "suffix", ""),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of", ""),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop", ""),
    (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop", ""),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2048}, 400, "max_tokens", "2048 tokens"),
    (COMPLETIONS, {"prompt": "hi", "n": 33}, 400, None, "max_num_seqs"),
    ("/tokenize", {}, 400, None, "prompt or messages"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", ""),
]


# Streamed or not, a refused request is a plain JSON error, never a 200 event stream.
CASES = [(*case, False) for case in BAD_REQUESTS] + [(*case, True) for case in BAD_REQUESTS
                                                     if case[0].startswith("/v1")]


@pytest.mark.parametrize(("path", "body", "status", "param", "contains", "stream"), CASES,
                         ids=[f"{p}-{json.dumps(b)[:60]}{'-stream' if st else ''}" for p, b, *_, st in CASES])
def test_bad_requests(server, path: str, body: dict, status: int, param: str | None, contains: str,
                      stream: bool) -> None:
    r = httpx.post(server.url + path, json={**body, "stream": True} if stream else body)
    assert_error(r, status, param, contains)


def test_too_long_message_says_the_numbers(server) -> None:
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "abc", "max_tokens": 2047})
    message = assert_error(r, 400, "max_tokens")["message"]
    assert "2048" in message and "2050" in message and "2047" in message


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[1, 2", b"\xff\xfe"])
def test_malformed_json(server, payload: bytes) -> None:
    r = httpx.post(server.url + CHAT, content=payload, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_fields_are_ignored(server) -> None:
    r = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "hi", "extra": 1}],
                                           "max_tokens": 2, "frobnicate": True, "metadata": {"a": "b"}})
    assert r.status_code == 200, r.text


def test_text_parts_and_tool_choice_none_are_accepted(server) -> None:
    r = httpx.post(server.url + CHAT, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_tokens": 2, "tool_choice": "none", "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text


def test_routing_errors_use_the_same_shape(server) -> None:
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + CHAT), 405)


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-falcon", messages=USER, temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_a_fault_in_one_request_fails_it_alone(server, monkeypatch) -> None:
    """A fault while emitting one request's tokens (here: its stop check) is a 500 for that request only;
    an innocent request in the same steps gets exactly its solo output, and the engine keeps serving."""
    import engine.llm_engine

    innocent = {"messages": USER, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    solo = httpx.post(server.url + CHAT, json=innocent).json()["choices"][0]["message"]["content"]
    real_check_stop = engine.llm_engine.check_stop

    def poisoned_check_stop(seq, *args):
        if seq.params.max_tokens == 7:
            raise RuntimeError("injected fault")
        return real_check_stop(seq, *args)

    monkeypatch.setattr(engine.llm_engine, "check_stop", poisoned_check_stop)
    errors_before = server.metric("falcon_serve:request_success_total", finished_reason="error")
    poisoned = {"messages": USER, "max_tokens": 7}
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(httpx.post, server.url + CHAT, json=poisoned, timeout=60)
        bad_stream = pool.submit(httpx.post, server.url + CHAT, json={**poisoned, "stream": True}, timeout=60)
        good = [pool.submit(httpx.post, server.url + CHAT, json=innocent, timeout=60) for _ in range(2)]
    assert_error(bad.result(), 500, contains="injected fault")
    r = bad_stream.result()
    assert r.status_code == 200  # the stream had started: the error comes in-band, then [DONE]
    events = [e[len("data: "):] for e in r.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]" and "injected fault" in json.loads(events[-2])["error"]["message"]
    for g in good:
        assert g.result().status_code == 200 and g.result().json()["choices"][0]["message"]["content"] == solo
    assert server.metric("falcon_serve:request_success_total", finished_reason="error") == errors_before + 2
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_idle()
    assert server.metric("falcon_serve:kv_cache_usage_perc") == 0


def test_a_fault_in_the_forward_pass_stops_the_engine(start_server, monkeypatch) -> None:
    """A fault that may corrupt shared state (here: the forward pass) is fatal: in-flight requests get an
    error, /health answers 503 with the reason (Kubernetes restarts the pod), new requests get 503."""
    live = start_server()
    llm = live.state.engine.engine

    def broken_forward(batch, sampled=None):
        raise RuntimeError("injected device fault")

    monkeypatch.setattr(llm.runner, "execute", broken_forward)
    r = httpx.post(live.url + CHAT, json={"messages": USER, "max_tokens": 4})
    assert_error(r, 503, contains="injected device fault")
    health = httpx.get(live.url + "/health")
    assert health.status_code == 503 and "injected device fault" in health.json()["error"]["message"]
    assert_error(httpx.post(live.url + CHAT, json={"messages": USER, "max_tokens": 4}), 503)
    live.stop()


def test_model_without_chat_template_gets_a_generic_one(tmp_path, start_server) -> None:
    """A base model's tokenizer often has no chat template: chat still works, with a logged warning."""
    from server.demo import build_demo_checkpoint

    directory = build_demo_checkpoint(tmp_path / "base", seed=3)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    live = start_server(model=str(directory))
    r = httpx.post(live.url + "/v1/chat/completions",
                   json={"model": "tiny-falcon", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
