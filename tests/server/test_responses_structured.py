"""/v1/responses with `text.format` (JSON object, JSON schema) and function tools, through the openai SDK
(create, stream, parse) and langchain-openai. Random weights: the output parses and matches its schema
only because the grammar makes it."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import MODEL_NAME
from tests.server.test_structured_tools import SCHEMAS, TIME, WEATHER

USER = "What is the weather in Paris?"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": TIME},
         {"type": "function", "name": "ping"}]  # no parameters
PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0}}}
FORMATS = [
    ({"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}, PERSON),
    ({"type": "json_schema", "name": "tags", "schema": {"type": "array", "items": {"enum": ["a", "b"]},
                                                         "minItems": 1, "maxItems": 3}}, None),
    ({"type": "json_object"}, {"type": "object"}),
]


@pytest.mark.parametrize("fmt, schema", FORMATS)
def test_text_format_plain_and_streamed(client: openai.OpenAI, fmt, schema) -> None:
    schema = schema or fmt["schema"]
    kwargs = dict(model=MODEL_NAME, input="Describe someone.", text={"format": fmt}, max_output_tokens=60,
                  temperature=1.0, extra_body={"seed": 5})
    r = client.responses.create(**kwargs)
    assert r.status == "completed" and r.text.format.type == fmt["type"]
    jsonschema.validate(json.loads(r.output_text), schema)
    with client.responses.stream(**kwargs) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    jsonschema.validate(json.loads(streamed), schema)
    assert streamed == final.output_text == r.output_text  # same seed, same text


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=150)


def test_parse_with_pydantic_text_format(client: openai.OpenAI) -> None:
    r = client.responses.parse(model=MODEL_NAME, input="Describe someone.", text_format=Person,
                               max_output_tokens=60, temperature=0)
    assert isinstance(r.output_parsed, Person)
    assert r.output_parsed == Person.model_validate_json(r.output_text)


def assert_valid_calls(items) -> None:
    calls = [item for item in items if item.type == "function_call"]
    assert calls
    for call in calls:
        assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_required_tools_give_function_call_items(tc: openai.OpenAI, temperature) -> None:
    r = tc.responses.create(model=MODEL_NAME, input=USER, tools=TOOLS, tool_choice="required",
                            max_output_tokens=200, temperature=temperature, extra_body={"seed": 7})
    assert r.status == "completed" and [item.type for item in r.output][0] == "function_call"
    assert_valid_calls(r.output)
    assert r.tool_choice == "required" and [t.name for t in r.tools] == ["get_weather", "get_time", "ping"]


def test_named_function_streamed_matches_plain(tc: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, input=USER, tools=TOOLS, max_output_tokens=200, temperature=0,
                  tool_choice={"type": "function", "name": "get_weather"})
    whole = tc.responses.create(**kwargs)
    events = list(tc.responses.create(**kwargs, stream=True))
    with tc.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    for response in (whole, final, events[-1].response):
        (call,) = response.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert_valid_calls(response.output)
    assert final.output[0].arguments == whole.output[0].arguments
    kinds = [e.type for e in events]
    n = kinds.count("response.function_call_arguments.delta")
    assert n >= 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added"] + [
        "response.function_call_arguments.delta"] * n + ["response.function_call_arguments.done",
                                                           "response.output_item.done", "response.completed"]
    added, done = events[2].item, events[-2].item
    assert added.type == "function_call" and added.arguments == "" and added.status == "in_progress"
    assert "".join(e.delta for e in events if e.type.endswith("arguments.delta")) == events[-3].arguments
    assert done.arguments == events[-3].arguments == events[-1].response.output[0].arguments
    assert done.call_id == added.call_id and done.id == added.id == events[-1].response.output[0].id
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_no_parallel_calls_means_one_call(tc: openai.OpenAI) -> None:
    for seed in range(3):
        r = tc.responses.create(model=MODEL_NAME, input=USER, tools=TOOLS, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=200, temperature=1.0,
                                extra_body={"seed": seed})
        assert len(r.output) == 1
        assert_valid_calls(r.output)


def test_auto_and_none(tc: openai.OpenAI) -> None:
    """auto: text, or text then valid calls; the streamed items equal the plain ones. none: text only."""
    for seed in range(3):
        kwargs = dict(model=MODEL_NAME, input=USER, tools=TOOLS, max_output_tokens=40, temperature=1.0,
                      extra_body={"seed": seed})
        r = tc.responses.create(**kwargs)
        with tc.responses.stream(**kwargs) as stream:
            final = stream.get_final_response()
        assert [(i.type, getattr(i, "arguments", None)) for i in final.output] == \
            [(i.type, getattr(i, "arguments", None)) for i in r.output]
        assert final.output_text == r.output_text
        if any(item.type == "function_call" for item in r.output):
            assert_valid_calls(r.output)
    r = tc.responses.create(model=MODEL_NAME, input=USER, tools=TOOLS, tool_choice="none", max_output_tokens=8,
                            temperature=0)
    plain = tc.responses.create(model=MODEL_NAME, input=USER, max_output_tokens=8, temperature=0)
    assert [item.type for item in r.output] == ["message"] and r.tool_choice == "none"
    assert r.usage.input_tokens > plain.usage.input_tokens  # the tools are in the prompt all the same


def test_tool_loop_replayed_as_input(tc: openai.OpenAI, tool_server) -> None:
    """A function_call and its function_call_output reach the prompt as an assistant tool call and a tool
    message: the response equals the chat completion of the same conversation."""
    first = tc.responses.create(model=MODEL_NAME, input=USER, tools=TOOLS, max_output_tokens=200, temperature=0,
                                tool_choice={"type": "function", "name": "get_time"})
    (call,) = first.output
    result = "12:00 UTC, the tool result"
    follow = [{"role": "user", "content": USER}, call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": result}]
    r = tc.responses.create(model=MODEL_NAME, input=follow, tools=TOOLS, tool_choice="none", max_output_tokens=8,
                            temperature=0)
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
    chat = tc.chat.completions.create(
        model=MODEL_NAME, tools=chat_tools, tool_choice="none", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": USER},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.call_id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": result}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"tools": TOOLS, "tool_choice": "required", "top_logprobs": 2}, "top_logprobs"),
    ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "bogus"}}], "tool_choice": "required"},
     "tools"),
])
def test_bad_tool_use_is_a_named_400(tool_server, body, param) -> None:
    import httpx

    r = httpx.post(tool_server.url + "/v1/responses", json={"model": MODEL_NAME, "input": USER, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_needs_the_server_flag(server) -> None:
    import httpx

    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL_NAME, "input": USER, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_langchain_bind_tools_round_trip(tool_server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL_NAME, base_url=tool_server.url + "/v1", api_key="unused", use_responses_api=True,
                     max_tokens=200, temperature=0, max_retries=0)
    weather = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    question = HumanMessage(USER)
    reply = llm.bind_tools(weather, tool_choice="get_weather").invoke([question])
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)
    # langchain replays the call and its result as function_call / function_call_output items
    history = [question, reply, ToolMessage("sunny, 21 C", tool_call_id=call["id"])]
    answer = llm.bind_tools(weather, tool_choice="none").invoke(history)
    assert answer.tool_calls == [] and answer.usage_metadata["input_tokens"] > reply.usage_metadata["input_tokens"]
    follow = tool_server_input(call, reply)
    direct = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused").responses.create(
        model=MODEL_NAME, input=follow, tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}],
        tool_choice="none", max_output_tokens=200, temperature=0)
    assert answer.text == direct.output_text


def tool_server_input(call, reply) -> list[dict]:
    """The input items of langchain's follow-up request, written out by hand."""
    call_item = next(b for b in reply.content if isinstance(b, dict) and b.get("type") == "function_call")
    return [{"role": "user", "content": USER},
            {"type": "function_call", "call_id": call_item["call_id"], "name": "get_weather",
             "arguments": call_item["arguments"]},
            {"type": "function_call_output", "call_id": call["id"], "output": "sunny, 21 C"}]


def test_streamed_text_then_parallel_calls_as_items() -> None:
    """The random model seldom writes a call under "auto": feed the tool parser's streamer text written
    the way a model writes calls, in small pieces, and check the events the SDK would read."""
    import itertools

    from server.responses import _tool_events
    from server.responses_stream import OutputStream
    from server.tool_parsers.hermes import HermesStreamer

    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    output, streamer = OutputStream(itertools.count(), "msg_1"), HermesStreamer()
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    raw = [e for i, piece in enumerate(pieces)
           for delta in streamer.feed(piece, final=i == len(pieces) - 1) for e in _tool_events(output, delta)]
    raw += output.close("completed")
    events = [json.loads(e.split("data: ", 1)[1]) for e in raw]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.output_item.added", "response.content_part.added"]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    assert kinds.count("response.function_call_arguments.done") == 2
    message, weather, time_call = output.items
    assert message.content[0].text == "Let me look." and message.status == "completed"
    assert (weather.name, json.loads(weather.arguments)) == ("get_weather", {"city": "Paris", "unit": "celsius"})
    assert (time_call.name, json.loads(time_call.arguments)) == ("get_time", {"zone": "CET"})
    for index, call in ((1, weather), (2, time_call)):
        deltas = [e["delta"] for e in events
                  if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == index]
        assert "".join(deltas) == call.arguments and call.status == "completed" and call.call_id.startswith("call_")
    # each item is added, grown and done before the next is added
    opened = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    closed = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert opened == closed == [0, 1, 2]
    assert [i for i, k in enumerate(kinds) if k == "response.output_item.done"][0] < kinds.index(
        "response.function_call_arguments.delta")


def test_a_template_that_drops_tool_calls_is_a_400_naming_the_item(start_server) -> None:
    import httpx

    from engine.tokenizer import DEFAULT_CHAT_TEMPLATE

    plain_template = start_server(chat_template=DEFAULT_CHAT_TEMPLATE)
    items = [{"role": "user", "content": USER},
             {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
    for replayed, param in ((items, "input"),  # the template cannot render an assistant message without content
                            ([items[0], {"role": "assistant", "content": "Checking."}, *items[1:]], "input.1")):
        r = httpx.post(plain_template.url + "/v1/responses",
                       json={"model": MODEL_NAME, "input": replayed, "instructions": "Be brief."})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
