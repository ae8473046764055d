"""Tool calling over HTTP with the real clients (openai SDK, langchain-openai): tool_choice required,
named and auto, parallel calls, streamed argument deltas, tool history in the prompt, and the 400s.
Random weights: every call parses and matches its function's schema only because of the grammar."""

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from engine.tokenizer import DEFAULT_CHAT_TEMPLATE
from tests.server.conftest import MODEL_NAME

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
         {"type": "function", "function": {"name": "ping"}}]  # no parameters
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME, "ping": {"type": "object", "maxProperties": 0}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_required_gives_valid_calls(tc, temperature):
    r = tc.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                   max_tokens=200, temperature=temperature, seed=11, n=3)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)


def test_no_parallel_calls_means_one_call(tc):
    r = tc.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=3, n=4)
    for choice in r.choices:
        assert len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls)


def test_named_function_streamed_and_reassembled_by_the_sdk(tc):
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=named, max_tokens=200, temperature=0)
    whole = tc.chat.completions.create(**kwargs)
    with tc.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    for completion in (whole, final):
        calls = completion.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_weather"
        assert_valid_calls(calls)
        assert completion.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.arguments == \
        whole.choices[0].message.tool_calls[0].function.arguments
    # OpenAI's shape: the first delta of a call has its id, type and name; later ones only arguments
    chunks = [c for c in tc.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [tcd for c in chunks for tcd in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:]) and len(deltas) > 2
    assert "".join(d.function.arguments for d in deltas) == whole.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_is_text_or_valid_calls_and_streams_the_same(tc):
    kwargs = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=60, temperature=0)
    whole = tc.chat.completions.create(**kwargs).choices[0]
    streamed = [c for c in tc.chat.completions.create(**kwargs, stream=True) if c.choices]
    if whole.message.tool_calls:
        assert_valid_calls(whole.message.tool_calls)
    else:
        assert whole.message.content and whole.finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == (whole.message.content or "")


def test_tool_history_reaches_the_prompt(tool_server, tc):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}]
    r = httpx.post(tool_server.url + "/tokenize", json={"messages": history, "tools": TOOLS}).json()
    prompt = httpx.post(tool_server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in prompt
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in prompt and '"name": "get_time"' in prompt
    answer = tc.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=5)
    assert answer.usage.prompt_tokens == r["count"]


@pytest.fixture(scope="module")
def no_tools_server(start_server):
    return start_server(settings=dict(tool_call_parser="hermes", enable_auto_tool_choice=True),
                        chat_template=DEFAULT_CHAT_TEMPLATE)


BAD = [  # (fields, param, message fragment)
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools", "bogus"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools", "unique"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", ""),
    ({"functions": [{"name": "f"}]}, "functions", "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0", ""),
]


@pytest.mark.parametrize("fields, param, fragment", BAD)
def test_bad_tool_requests_are_400(tool_server, fields, param, fragment):
    r = httpx.post(tool_server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and (param is None or error["param"] == param), error


def test_auto_needs_the_flag_and_tools_need_a_template_that_reads_them(server, no_tools_server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "tools": TOOLS, "max_tokens": 5})
    assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]
    for choice in ("auto", "required", "none"):
        r = httpx.post(no_tools_server.url + "/v1/chat/completions",
                       json={"messages": USER, "tools": TOOLS, "tool_choice": choice, "max_tokens": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


# ---------------------------------------------------------------- langchain-openai


class WeatherArgs(BaseModel):
    city: str = Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]


@tool(args_schema=WeatherArgs)
def get_weather(city: str, unit: str) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


class Answer(BaseModel):
    """The answer."""

    verdict: bool
    score: int = Field(ge=0, le=10)


def chat_model(tool_server, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL_NAME, base_url=tool_server.url + "/v1", api_key="unused", max_retries=0,
                      max_tokens=150, temperature=0, **kwargs)


def test_langchain_bind_tools_round_trip(tool_server):
    llm = chat_model(tool_server)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    first = forced.invoke([HumanMessage("Weather in Paris?")])
    assert len(first.tool_calls) == 1 and first.tool_calls[0]["name"] == "get_weather"
    args = first.tool_calls[0]["args"]
    WeatherArgs.model_validate(args)
    result = get_weather.invoke(first.tool_calls[0])
    assert isinstance(result, ToolMessage)
    second = llm.bind_tools([get_weather]).invoke([HumanMessage("Weather in Paris?"), first, result])
    assert second.tool_calls or isinstance(second.content, str)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(tool_server, method):
    structured = chat_model(tool_server).with_structured_output(Answer, method=method)
    answer = structured.invoke("Is the sky blue? Score it.")
    assert isinstance(answer, Answer) and 0 <= answer.score <= 10


def test_tool_flags_on_the_command_line(tmp_path):
    from server.cli import TOOL_CALL_PARSERS, build_parser, parse_args
    from server.tool_parsers import TOOL_PARSERS

    assert TOOL_CALL_PARSERS == sorted(TOOL_PARSERS)
    args = parse_args(build_parser(), ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    assert args.tool_call_parser == "hermes" and args.enable_auto_tool_choice
    with pytest.raises(SystemExit):
        parse_args(build_parser(), [str(tmp_path), "--enable-auto-tool-choice"])  # a model, but no parser
