"""/tokenize, /detokenize (vLLM's shapes), /version and /health."""

from __future__ import annotations

import httpx


def test_tokenize_prompt_and_detokenize_round_trip(server) -> None:
    tokenizer = server.state.engine.tokenizer
    text = "Hello, wörld! 🦅"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode(text)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    assert len(r["token_strs"]) == r["count"] and all(isinstance(s, str) for s in r["token_strs"])
    back = httpx.post(server.url + "/detokenize", json={"model": "tiny-falcon", "tokens": r["tokens"]}).json()
    assert back == {"prompt": text}


def test_tokenize_messages_matches_chat_prompt(server) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert r["token_strs"] is None
    usage = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert r["count"] == usage["usage"]["prompt_tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"


def test_tokenize_unknown_model(server) -> None:
    r = httpx.post(server.url + "/tokenize", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_version_and_health(server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    version = httpx.get(server.url + "/version").json()["version"]
    assert isinstance(version, str) and version
