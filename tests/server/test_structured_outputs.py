"""Structured outputs over HTTP with the openai SDK: response_format (json_object, json_schema and
`.parse()` with a pydantic model), vLLM's structured_outputs and guided_* fields, on chat and
completions, streamed and not. The weights are random, so only the grammar makes the outputs valid."""

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import MODEL_NAME

USER = [{"role": "user", "content": "Describe the weather as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "temp", "tags"],
          "properties": {"city": {"type": "string", "maxLength": 6}, "temp": {"type": "integer", "minimum": -40,
                                                                               "maximum": 50},
                         "tags": {"type": "array", "items": {"enum": ["sun", "rain", "wind"]}, "maxItems": 3},
                         "note": {"type": ["string", "null"], "maxLength": 4}}}


class Day(BaseModel):
    weekday: Literal["mon", "tue", "wed"]
    rain_mm: int = Field(ge=0, le=99)


class Forecast(BaseModel):
    city: str = Field(max_length=6)
    days: list[Day] = Field(max_length=2)
    warning: bool


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, timeout=120)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_parse_with_a_pydantic_model(client: openai.OpenAI, temperature):
    completion = client.chat.completions.parse(model=MODEL_NAME, messages=USER, response_format=Forecast,
                                               max_tokens=150, temperature=temperature, seed=5)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Forecast)
    assert Forecast.model_validate_json(message.content) == message.parsed


def test_json_schema_streamed_equals_not_streamed(client: openai.OpenAI):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    whole = client.chat.completions.create(model=MODEL_NAME, messages=USER, response_format=fmt, max_tokens=120,
                                           temperature=0, n=2)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, response_format=fmt, max_tokens=120,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content == whole.choices[1].message.content
    jsonschema.validate(json.loads(streamed), SCHEMA)


def test_json_object(client: openai.OpenAI):
    completion = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=200, temperature=0.8,
                                                seed=1, n=3, response_format={"type": "json_object"})
    finished = [c for c in completion.choices if c.finish_reason == "stop"]
    assert finished
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)


def test_vllm_fields_on_completions_and_chat(server):
    regex = r"[A-Z]{2}-[0-9]{3}"
    lark = 'start: "x=" NUM (" + " NUM)?\nNUM: /[0-9]{1,3}/'
    cases = [  # (request fields, check of the text)
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) or True),
        ({"structured_outputs": {"regex": regex}}, lambda t: re.fullmatch(regex, t)),
        ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
        ({"structured_outputs": {"grammar": lark}}, lambda t: re.fullmatch(r"x=[0-9]{1,3}( \+ [0-9]{1,3})?", t)),
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) or True),
        ({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
        ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
        ({"guided_grammar": lark}, lambda t: re.fullmatch(r"x=[0-9]{1,3}( \+ [0-9]{1,3})?", t)),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMA) or True),
    ]
    for fields, valid in cases:
        r = post(server, "/v1/completions", {"prompt": "Answer:", "max_tokens": 100, "temperature": 1.0,
                                             "seed": 2, "n": 2, **fields})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop" and valid(choice["text"]), (fields, choice)
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 50, "stream": True,
                                              "guided_choice": ["left", "right"]})
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in r.text.splitlines()
                   if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert text in ("left", "right")


BAD = [  # (request fields, param, message fragment)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs", "missing"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", ""),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json", "one way"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
]


@pytest.mark.parametrize("fields, param, fragment", BAD)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_invalid_constraints_are_400(server, path, fields, param, fragment):
    body = {"messages": USER} if "chat" in path else {"prompt": "hi"}
    r = post(server, path, {**body, "max_tokens": 5, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and (param is None or error["param"] == param), error


@pytest.mark.parametrize("field, value", [("use_beam_search", True), ("bad_words", ["x"]),
                                          ("continue_final_message", True), ("allowed_token_ids", [5])])
def test_output_changing_fields_that_are_not_implemented_are_refused(server, field, value):
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, field: None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, field, value, default", [
    ("/v1/chat/completions", "spaces_between_special_tokens", False, True),
    ("/v1/completions", "length_penalty", 0.5, 1.0),
    ("/v1/completions", "return_tokens_as_token_ids", True, False),
    ("/v1/chat/completions", "reasoning_effort", "high", None),
    ("/v1/chat/completions", "echo", True, False),  # vLLM's chat echo; /v1/completions implements echo
    ("/v1/chat/completions", "add_special_tokens", True, False),
    ("/v1/chat/completions", "modalities", ["text", "audio"], ["text"]),
])
def test_fields_accepted_only_at_their_default(server, path, field, value, default):
    """A value that would change the output is refused; the value that needs nothing is accepted."""
    prompt = {"messages": USER} if "chat" in path else {"prompt": "x"}
    r = post(server, path, {**prompt, "max_tokens": 2, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    r = post(server, path, {**prompt, "max_tokens": 2, field: default})
    assert r.status_code == 200, r.text
