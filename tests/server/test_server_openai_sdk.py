"""The official openai SDK against a live server: sync and async, streamed and not."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

MODEL_NAME = "tiny-falcon"  # as served by conftest.py

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME, "alias"]
    assert all(m.object == "model" and m.owned_by == "falcon-serve" for m in models)
    assert models[0].model_extra["max_model_len"] == 2048


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8 and r.usage.prompt_tokens > 10


def test_chat_alias_and_omitted_model(server, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="alias", messages=MESSAGES, max_tokens=2)
    assert r.model == "alias"
    body = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).json()
    assert body["model"] == MODEL_NAME


def test_chat_greedy_is_deterministic_and_seed_reproducible(client: openai.OpenAI) -> None:
    def run(**kw) -> str:
        return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12,
                                              **kw).choices[0].message.content

    assert run(temperature=0) == run(temperature=0)
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)


def test_chat_n2(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0,
                                       seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 12


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the sampled token is the most likely one
        assert math.isclose(entry.logprob, tops[0], rel_tol=1e-5)
    without = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert without.choices[0].logprobs is None


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completion_text_and_token_prompts(server, client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completion_batch_of_token_prompts_with_logprobs(client: openai.OpenAI) -> None:
    prompts = [[5 + i for i in range(8)], [40, 41, 42]]
    r = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=4, temperature=0, logprobs=2,
                                  n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 16
    for choice in r.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
        assert lp.text_offset[0] == 0
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            # 2 most likely + the sampled one, fewer where tokens read alike (partial UTF-8 bytes)
            assert 1 <= len(top) <= 3 and top[token] == pytest.approx(logprob)
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples agree


def test_completion_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Echo me")


def test_completion_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="Stream this", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == client.completions.create(**kw).choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_async_client(async_client: openai.AsyncOpenAI, stream: bool) -> None:
    async def one(i: int) -> str:
        kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8,
                  temperature=0)
        if not stream:
            return (await async_client.chat.completions.create(**kw)).choices[0].message.content
        parts = []
        async for chunk in await async_client.chat.completions.create(stream=True, **kw):
            parts += [c.delta.content or "" for c in chunk.choices]
        return "".join(parts)

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(one(i) for i in range(4)))
        finally:
            await async_client.close()

    results = asyncio.run(main())
    assert len(results) == 4 and all(isinstance(r, str) for r in results)
