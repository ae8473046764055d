"""Raw SSE framing with httpx: event shape, chunk order, usage, [DONE], and streamed == non-streamed."""

from __future__ import annotations

import json

import httpx
import pytest

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a complete SSE body, checking the framing on the way."""
    body = response.text
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def post_stream(server, path: str, body: dict) -> list[dict]:
    r = httpx.post(server.url + path, json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_stream_framing(server) -> None:
    chunks = post_stream(server, "/v1/chat/completions",
                         {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    first, *rest = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["id"].startswith("chatcmpl-")
    for c in chunks:
        assert (c["id"], c["object"], c["model"], c["created"]) == (
            first["id"], "chat.completion.chunk", "tiny-falcon", first["created"])
        assert "usage" not in c  # only with stream_options.include_usage
        (choice,) = c["choices"]
        assert set(choice) >= {"index", "delta", "logprobs", "finish_reason"}
    assert all("role" not in c["choices"][0]["delta"] for c in rest)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_chat_stream_usage_chunk(server) -> None:
    chunks = post_stream(server, "/v1/chat/completions",
                         {"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                          "stream_options": {"include_usage": True}})
    *content, last = chunks
    assert all(c["usage"] is None for c in content)  # OpenAI: null on every chunk but the last
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5


def test_chat_stream_n2_with_seed_matches_non_streamed(server) -> None:
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0.9, "seed": 11, "n": 2}
    chunks = post_stream(server, "/v1/chat/completions", body)
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1]
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert set(finishes) == {0, 1}
    plain = post(server, "/v1/chat/completions", body)
    assert [c["message"]["content"] for c in plain["choices"]] == [texts[0], texts[1]]
    assert [c["finish_reason"] for c in plain["choices"]] == [finishes[0], finishes[1]]


def _stop_string(text: str) -> str:
    """A two-character piece from the middle of `text` that makes a clean stop string."""
    for i in range(3, len(text) - 2):
        piece = text[i:i + 2]
        if "\ufffd" not in piece and piece.isprintable() and text.index(piece) == i:
            return piece
    pytest.skip("the random model produced no usable stop string")


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_streamed_equals_non_streamed(server, include_stop: bool) -> None:
    base = {"prompt": "The weather today", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = post(server, "/v1/completions", base)["choices"][0]["text"]
    stop = _stop_string(full)
    body = {**base, "stop": [stop], "include_stop_str_in_output": include_stop}
    plain = post(server, "/v1/completions", body)["choices"][0]
    expected = full[:full.index(stop)] + (stop if include_stop else "")
    assert (plain["text"], plain["finish_reason"], plain["stop_reason"]) == (expected, "stop", stop)
    chunks = post_stream(server, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream_echo_and_logprobs_match_non_streamed(server) -> None:
    body = {"prompt": [10, 20, 30, 40], "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    chunks = post_stream(server, "/v1/completions", body)
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in streamed:
            streamed[key] += c["choices"][0]["logprobs"][key]
    plain = post(server, "/v1/completions", body)["choices"][0]
    assert streamed["tokens"] == plain["logprobs"]["tokens"]
    assert streamed["text_offset"] == plain["logprobs"]["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)

    echoed = post_stream(server, "/v1/completions", {**body, "logprobs": None, "echo": True})
    prompt_text = httpx.post(server.url + "/detokenize", json={"tokens": [10, 20, 30, 40]}).json()["prompt"]
    assert echoed[0]["choices"][0]["text"].startswith(prompt_text)
    assert "".join(c["choices"][0]["text"] for c in echoed) == prompt_text + plain["text"]


def test_completion_stream_several_prompts(server) -> None:
    body = {"prompt": ["first prompt", "second"], "max_tokens": 6, "temperature": 0, "n": 2, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks = post_stream(server, "/v1/completions", body)
    texts: dict[int, str] = {}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    plain = post(server, "/v1/completions", {**body, "stream": False})
    assert texts == {c["index"]: c["text"] for c in plain["choices"]}
    assert chunks[-1]["usage"] == plain["usage"]


def test_chat_stream_logprobs(server) -> None:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 2}
    chunks = post_stream(server, "/v1/chat/completions", body)
    streamed = [entry for c in chunks[1:] for entry in c["choices"][0]["logprobs"]["content"]]
    plain = post(server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in streamed] == [e["token"] for e in plain]
    assert len(streamed) == 6 and all(len(e["top_logprobs"]) == 2 for e in streamed)
