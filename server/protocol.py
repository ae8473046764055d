"""Request and response bodies of the OpenAI-compatible API (OpenAI's shapes, vLLM's extra fields).

Requests ignore unknown fields, as OpenAI's and vLLM's servers do. Types are strict, as OpenAI's are:
no string-to-number or string-to-bool coercion, and a boolean is not an integer. Text must be valid
Unicode (JSON can spell lone surrogates). Here we check types, shapes and the ranges OpenAI documents
where they are narrower than the engine's; the other range checks live in the engine
(`SamplingParams`, then `engine.request_checks` against the model's limits).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # unknown fields are accepted and ignored


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """Where in a decoded JSON value a string holds a lone surrogate (not encodable as UTF-8), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate_at(key, path) or _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate_at(item, f"{path}[{i}]")
            if found:
                return found
    return None


class RequestBody(RequestModel):
    """A whole request body: also checks that all its text is valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = _lone_surrogate_at(data, "")
        if where:
            raise ValueError(f"{where} is not valid Unicode text (it contains a lone surrogate)")
        return data


# ------------------------------------------------------------------ shared request parts


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs` object. Unknown keys are refused: each would change the output."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_schema: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False  # JSON has no free whitespace here anyway
    disable_fallback: bool = False  # one backend (llguidance): nothing to fall back to


# Fields that OpenAI or vLLM define, that would change the output, and that are not implemented: set
# to anything but an empty value they are refused, never silently ignored.
NOT_SUPPORTED = {
    "use_beam_search": "beam search", "bad_words": "bad_words", "allowed_token_ids": "allowed_token_ids",
    "truncate_prompt_tokens": "prompt truncation", "logits_processors": "logits processors",
    "continue_final_message": "continue_final_message", "documents": "documents", "audio": "audio output",
}


# Fields that are accepted only at the value that needs no implementation (the behaviour here); any
# other value would change the output and is refused.
DEFAULT_ONLY = {"spaces_between_special_tokens": True, "length_penalty": 1.0, "return_tokens_as_token_ids": False,
                "reasoning_effort": None}
CHAT_DEFAULT_ONLY = {"echo": False, "add_special_tokens": False}  # on /v1/completions both are implemented


def _refuse_unsupported(data: Any, default_only: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        return data
    for name, what in NOT_SUPPORTED.items():
        if data.get(name) not in (None, False, [], {}, ""):
            raise ValueError(f"{name}: {what} is not supported")
    for name, default in default_only.items():
        if data.get(name) is not None and data[name] != default:
            raise ValueError(f"{name}: only {default!r} is supported, got {data[name]!r}")
    return data


class SamplingFields(RequestBody):
    """Fields shared by chat and completions: OpenAI's sampling fields plus vLLM's extras."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return _refuse_unsupported(data, DEFAULT_ONLY)

    model: str | None = None  # None: the served model (vLLM accepts a missing model too)
    n: int = 1
    temperature: float | None = Field(default=None, ge=0, le=2)  # OpenAI's range; the engine allows more
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None  # the older spellings of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None


# ------------------------------------------------------------------ chat


class TextPart(RequestModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, replayed in a tool loop
    tool_call_id: str | None = None  # a "tool" message answers this call


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported_in_chat(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("modalities") not in (None, ["text"]):
            raise ValueError(f"modalities: only ['text'] is supported, got {data['modalities']!r}")
        return _refuse_unsupported(data, CHAT_DEFAULT_ONLY)

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    # OpenAI's deprecated function calling: refused (use tools)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template: str | None = None  # refused unless the server runs with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM extra: the stop string or token id that ended it


class PromptLogprob(BaseModel):
    """vLLM's `prompt_logprobs` entry, keyed by token id."""

    logprob: float
    rank: int
    decoded_token: str | None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served by the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra, when the request asks for them


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # "role", "content", "tool_calls" as they change; absent keys are not sent, like OpenAI
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------ completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI allows 5; vLLM 20
    suffix: str | None = None
    best_of: int | None = None
    # vLLM extra
    add_special_tokens: bool = True


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; the first has no context (None, as OpenAI sends it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra, when the request asks for them


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------ models, tokenize, errors


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "falcon-serve"
    root: str
    parent: str | None = None
    max_model_len: int  # vLLM extra


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # rendered by the chat template with the messages
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
