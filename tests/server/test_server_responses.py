"""POST /v1/responses through the openai SDK: plain, streamed (raw events and the SDK's stream helper),
message-item input with instructions, logprobs, usage, and a named 400 for every field it cannot honour.
(text.format and function tools: tests/server/test_responses_structured.py.)"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME

INPUT = [{"role": "developer", "content": "You are terse."},
         {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]


def chat_equivalent(client: openai.OpenAI, max_tokens: int) -> str:
    """The same conversation through chat completions: the Responses API must produce the same text."""
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=max_tokens, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "system", "content": "You are terse."},
                                                 {"role": "user", "content": "Say hello."}])
    return r.choices[0].message.content


def test_responses_create(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL_NAME, input=INPUT, instructions="Be brief.", max_output_tokens=6,
                                temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_NAME
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert r.output_text == message.content[0].text == chat_equivalent(client, 6)
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # the cut-off
    plain = client.responses.create(model=MODEL_NAME, input="Hello", max_output_tokens=3, temperature=0,
                                    top_logprobs=2)
    logprobs = plain.output[0].content[0].logprobs
    assert len(logprobs) == 3 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)


def test_responses_stream_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL_NAME, input=INPUT, instructions="Be brief.",
                                          max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * deltas + [
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == events[-4].text == final.output_text == chat_equivalent(client, 6)
    assert final.usage.output_tokens == 6 and final.id == events[0].response.id


def test_responses_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL_NAME, input="Hello there", max_output_tokens=5, temperature=0) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    plain = client.responses.create(model=MODEL_NAME, input="Hello there", max_output_tokens=5, temperature=0)
    assert text == final.output_text == plain.output_text and final.usage.output_tokens == 5


@pytest.mark.parametrize("extra, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "parameters": {}}]}, "tools"),  # no name
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),  # no schema
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}}, "text.format"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "4"}]}, "input"),  # no call_id
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_unsupported_fields_are_named_400s(server, extra, param) -> None:
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL_NAME, "input": "Hi", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_langchain_use_responses_api(server, client: openai.OpenAI) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL_NAME, base_url=server.url + "/v1", api_key="unused", use_responses_api=True,
                     max_tokens=5, temperature=0, max_retries=0)
    reply = llm.invoke("Hello there")
    plain = client.responses.create(model=MODEL_NAME, input="Hello there", max_output_tokens=5, temperature=0)
    assert reply.text == plain.output_text and reply.usage_metadata["output_tokens"] == 5
    assert "".join(chunk.text for chunk in llm.stream("Hello there")) == plain.output_text
