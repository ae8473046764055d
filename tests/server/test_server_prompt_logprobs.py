"""Scoring prompts over HTTP with the openai SDK: /v1/completions echo + logprobs (max_tokens 0 or more,
streamed or not) and vLLM's prompt_logprobs extra, checked against transformers on the served checkpoint."""

from __future__ import annotations

import httpx
import openai
import pytest

from engine.tokenizer import Tokenizer
from tests.server.conftest import MODEL_NAME
from tests.tiny_models import reference_prompt_logprobs

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def prompt_ids(checkpoint) -> list[int]:
    return Tokenizer.from_pretrained(checkpoint).encode(PROMPT)


@pytest.fixture(scope="module")
def reference(checkpoint, prompt_ids) -> list[float]:
    """transformers' logprob of each prompt token after the first."""
    dist = reference_prompt_logprobs(checkpoint, prompt_ids)
    return [float(dist[p - 1, t]) for p, t in enumerate(prompt_ids) if p > 0]


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, prompt_ids, reference) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    (choice,) = r.choices
    lp = choice.logprobs
    n = len(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx(reference, abs=1e-4)
    assert "".join(lp.tokens[:n]) == PROMPT and choice.text.startswith(PROMPT)
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 3)]
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == value and 2 <= len(top) <= 3  # the actual token plus the top 2
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 3


def test_max_tokens_zero_with_echo_generates_nothing(server, client: openai.OpenAI, prompt_ids, reference) -> None:
    counted = server.metric("falcon_serve:prompt_tokens_total")
    r = client.completions.create(model=MODEL_NAME, prompt=[prompt_ids, prompt_ids[:5]], echo=True, logprobs=0,
                                  max_tokens=0)
    first, second = r.choices
    assert first.text == PROMPT and first.finish_reason == "length"
    assert first.logprobs.token_logprobs[1:] == pytest.approx(reference, abs=1e-4)
    assert len(second.logprobs.tokens) == 5
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(prompt_ids) + 5
    assert server.metric("falcon_serve:prompt_tokens_total") - counted == len(prompt_ids) + 5
    echo_only = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, max_tokens=0)
    assert echo_only.choices[0].text == PROMPT and echo_only.choices[0].logprobs is None


def test_streamed_echo_logprobs_equal_the_whole_response(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=1, max_tokens=4, temperature=0, n=2,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    streamed: dict[int, dict[str, list]] = {}
    text: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            merged = streamed.setdefault(c.index, {"tokens": [], "token_logprobs": [], "text_offset": []})
            for key in merged:
                merged[key] += getattr(c.logprobs, key)
    for choice in whole.choices:
        assert text[choice.index] == choice.text
        assert streamed[choice.index]["tokens"] == choice.logprobs.tokens
        assert streamed[choice.index]["text_offset"] == choice.logprobs.text_offset
        assert streamed[choice.index]["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)


def test_vllm_prompt_logprobs_extra(client: openai.OpenAI, prompt_ids, reference) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1,
                                  extra_body={"prompt_logprobs": 3})
    entries = r.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt_ids)
    for token, entry, value in zip(prompt_ids[1:], entries[1:], reference):
        assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-4)
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:3] == [1, 2, 3] and len(entry) == 3 + (entry[str(token)]["rank"] > 3)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    chat_entries = chat.model_extra["prompt_logprobs"]
    assert chat_entries[0] is None and len(chat_entries) == chat.usage.prompt_tokens
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in chat_entries[1:])


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_scoring_requests_are_400(server, body, param) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
