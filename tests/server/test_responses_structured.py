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


@pytest.fixture(scope="module")
def tool_server(start_server):
    return start_server(settings=dict(tool_call_parser="hermes", enable_auto_tool_choice=True))


@pytest.fixture
def tc(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("fmt, schema", FORMATS)
def test_text_format_plain_and_streamed(client: openai.OpenAI, fmt, schema) -> None:
    schema = schema or fmt["schema"]
    kwargs = dict(model=MODEL_NAME, input="Describe someone.", text={"format": fmt}, max_output_tokens=60,
                  temperature=1.0, seed=5)
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
                            max_output_tokens=200, temperature=temperature, seed=7)
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
                                parallel_tool_calls=False, max_output_tokens=200, temperature=1.0, seed=seed)
        assert len(r.output) == 1
        assert_valid_calls(r.output)


def test_auto_and_none(tc: openai.OpenAI) -> None:
    """auto: text, or text then valid calls; the streamed items equal the plain ones. none: text only."""
    for seed in range(3):
        kwargs = dict(model=MODEL_NAME, input=USER, tools=TOOLS, max_output_tokens=40, temperature=1.0, seed=seed)
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
    assert r.output_text != plain.output_text or r.usage.input_tokens > plain.usage.input_tokens  # tools in prompt


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
    bound = llm.bind_tools([{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
                           tool_choice="get_weather")
    question = HumanMessage(USER)
    reply = bound.invoke([question])
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)
    answer = llm.invoke([question, reply, ToolMessage("sunny, 21 C", tool_call_id=call["id"])])
    assert isinstance(answer.text, str) and answer.usage_metadata["input_tokens"] > reply.usage_metadata["input_tokens"]
