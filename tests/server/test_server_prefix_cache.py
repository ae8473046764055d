"""The prefix cache seen by clients: `usage.prompt_tokens_details.cached_tokens` through the openai SDK
(chat and completions, streamed and not), the same text with the cache on and off, and its metrics."""

from __future__ import annotations

import uuid

import openai
import pytest

MODEL_NAME = "tiny-falcon"
SYSTEM = {"role": "system", "content": "You are a terse assistant who answers every question in one line. " * 3}


@pytest.fixture(scope="module")
def uncached(start_server):
    return start_server(enable_prefix_caching=False)


def ask(client: openai.OpenAI, messages: list[dict], **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}, **kw)


def test_chat_turns_report_cached_tokens_and_match_the_uncached_server(server, uncached) -> None:
    cached_client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    plain = openai.OpenAI(base_url=uncached.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    hits_before = server.metric("falcon_serve:prefix_cache_hits_total")
    messages = [SYSTEM]
    cached = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question number {turn}: why is the sky blue?"})
        got, want = ask(cached_client, messages), ask(plain, messages)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert want.usage.prompt_tokens_details.cached_tokens == 0
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        cached.append(got.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": got.choices[0].message.content})
    # Turn 2 and 3 resend the conversation: at least the previous prompt comes from the cache.
    assert cached[1] > 0 and cached[2] > cached[1]
    assert server.metric("falcon_serve:prefix_cache_hits_total") - hits_before >= sum(cached)
    assert server.metric("falcon_serve:prefix_cache_queries_total") > 0
    assert 0 < server.metric("falcon_serve:prefix_cache_checkpoint_usage_perc") <= 1
    assert uncached.metric("falcon_serve:prefix_cache_queries_total") == 0


def test_streamed_usage_and_completions_report_cached_tokens(client: openai.OpenAI) -> None:
    messages = [SYSTEM, {"role": "user", "content": f"Name a colour. {uuid.uuid4().hex}"}]
    ask(client, messages)
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    prompt = f"{uuid.uuid4().hex}: once upon a time, in a land far away, there lived a " * 2  # new to the cache
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=MODEL_NAME, prompt=[prompt, prompt + "cat"], max_tokens=4,
                                      temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_a_resent_responses_conversation_hits(client: openai.OpenAI) -> None:
    """The Responses API keeps no state (previous_response_id is refused), so clients resend the whole
    conversation, and that hits like a resent chat."""
    conversation = [{"role": "system", "content": SYSTEM["content"]},
                    {"role": "user", "content": f"Count to three. {uuid.uuid4().hex}"}]
    first = client.responses.create(model=MODEL_NAME, input=conversation, max_output_tokens=6, temperature=0)
    conversation += [{"role": "assistant", "content": first.output_text},
                     {"role": "user", "content": "And to four?"}]
    second = client.responses.create(model=MODEL_NAME, input=conversation, max_output_tokens=6, temperature=0)
    assert second.usage.input_tokens_details.cached_tokens > 0
