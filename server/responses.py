"""POST /v1/responses: OpenAI's Responses API for a stateless text model. `input` (a string or message
items) and `instructions` go through the chat template; the output is one assistant message. Streamed,
the events are those the openai SDK parses, always ending with `response.completed` (whose status is
"incomplete" when max_output_tokens cut the text, as vLLM does). Nothing is stored: `store: true` and
`previous_response_id` are refused, as are tools, structured `text.format`, reasoning and background mode."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from server.errors import bad_request
from server.generation import Choice, ClientDisconnected, collect, sampling_params, submit, until_disconnected
from server.logprobs import chat_logprobs
from server.prompts import encode, render_chat
from server.protocol import SamplingFields
from server.protocol_responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from server.sse import EventStreamResponse
from server.state import ServerState

LOGPROBS_INCLUDE = "message.output_text.logprobs"

# Fields this server cannot honour: any value but "unset" is refused, naming the field.
_NOT_SUPPORTED = {
    "previous_response_id": "this server stores no responses; send the whole conversation as input",
    "tools": "tools (function calling and built-in tools) are not supported yet",
    "reasoning": "reasoning options are not supported by this model",
    "background": "background mode is not supported",
    "conversation": "conversations are not supported; send the whole conversation as input",
    "prompt": "prompt templates are not supported",
    "context_management": "context management is not supported",
}


def _reject_unsupported(req: ResponsesRequest) -> None:
    for name, why in _NOT_SUPPORTED.items():
        if getattr(req, name) not in (None, False, [], {}):
            raise bad_request(f"{name} is not supported: {why}", name)
    if req.store:
        raise bad_request("store is not supported: this server stores no responses; set store to false", "store")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported yet (tools are not supported)", "tool_choice")
    if req.text is not None and req.text.format is not None and req.text.format.type != "text":
        raise bad_request(f"text.format of type {req.text.format.type!r} is not supported yet; only 'text' is",
                          "text.format")
    if req.truncation == "auto":
        raise bad_request("truncation 'auto' is not supported; only 'disabled'", "truncation")
    for value in req.include or []:
        if value != LOGPROBS_INCLUDE:
            raise bad_request(f"include value {value!r} is not supported; only {LOGPROBS_INCLUDE!r}", "include")


def _messages(req: ResponsesRequest) -> list[dict[str, str]]:
    """Chat messages: instructions as the system message, then the input (a string is one user message)."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    if not req.input:
        raise bad_request("input must not be empty", "input")
    for i, item in enumerate(req.input):
        if item.type != "message" or item.role is None:
            raise bad_request(f"input[{i}]: items of type {item.type!r} are not supported; only messages "
                              "with a role", "input")
        content = item.content or ""
        if not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type not in ("input_text", "output_text") or part.text is None:
                    raise bad_request(f"input[{i}].content[{j}]: parts of type {part.type!r} are not supported; "
                                      "only text", "input")
            content = "".join(part.text for part in content)
        messages.append({"role": "system" if item.role == "developer" else item.role, "content": content})
    return messages


def _event(kind: str, sequence: itertools.count, **fields: Any) -> str:
    """One server-sent event as OpenAI sends it: its type both as the event name and in the data."""
    data = {"type": kind, "sequence_number": next(sequence),
            **{k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def create_response(req: ResponsesRequest, request: Request, state: ServerState) -> Response:
    arrival = time.monotonic()
    model = state.check_model(req.model)
    engine = state.ready_engine()
    _reject_unsupported(req)
    tokenizer = engine.tokenizer
    text = await render_chat(tokenizer, _messages(req), True, {})
    # The template already holds the special tokens it wants (as for chat completions).
    prompt = await encode(tokenizer, text, add_special_tokens=False)
    want_logprobs = req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or [])
    top_k = req.top_logprobs or 0
    fields = SamplingFields(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    params = sampling_params(fields, max_tokens=req.max_output_tokens, logprobs=top_k if want_logprobs else None,
                             prompt_logprobs=None)
    response_id, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    created = int(time.time())
    generation = submit(state, engine, response_id, [prompt], params, arrival, prompt_param="input")

    def response(status: str, output: list[OutputMessage], usage: ResponseUsage | None = None) -> ResponseObject:
        return ResponseObject(
            id=response_id, created_at=created, status=status, model=model, output=output, usage=usage,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=params.temperature,
            top_p=params.top_p, top_logprobs=req.top_logprobs, metadata=req.metadata)

    def logprobs(token_ids: list[int], values: list[dict[int, float]]) -> list:
        return chat_logprobs(tokenizer, token_ids, values, top_k) if want_logprobs else []

    def final(choice: Choice) -> ResponseObject:
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        text = OutputText(text=choice.text, logprobs=logprobs(choice.token_ids, choice.logprobs))
        usage = ResponseUsage(input_tokens=len(prompt), output_tokens=len(choice.token_ids),
                              total_tokens=len(prompt) + len(choice.token_ids),
                              input_tokens_details=InputTokensDetails(cached_tokens=choice.num_cached_tokens))
        return response(status, [OutputMessage(id=item_id, status=status, content=[text])], usage)

    if not req.stream:
        try:
            choices = await until_disconnected(request, collect(generation, 1))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            generation.close()
        return JSONResponse(final(choices[0]).model_dump())

    async def events() -> AsyncIterator[str]:
        sequence = itertools.count()
        where = dict(item_id=item_id, output_index=0, content_index=0)
        yield _event("response.created", sequence, response=response("in_progress", []))
        yield _event("response.in_progress", sequence, response=response("in_progress", []))
        yield _event("response.output_item.added", sequence, output_index=0,
                     item=OutputMessage(id=item_id, status="in_progress", content=[]))
        yield _event("response.content_part.added", sequence, **where, part=OutputText(text=""))
        choice = Choice()
        async for _, out in generation.outputs():
            choice.add(out)  # an engine failure raises here and is reported in the stream
            delta_logprobs = logprobs(out.new_token_ids, out.new_logprobs or [])
            if out.new_text or delta_logprobs:
                yield _event("response.output_text.delta", sequence, **where, delta=out.new_text,
                             logprobs=[lp.model_dump() for lp in delta_logprobs])
        done = final(choice)
        (part,) = done.output[0].content
        yield _event("response.output_text.done", sequence, **where, text=part.text,
                     logprobs=[lp.model_dump() for lp in part.logprobs])
        yield _event("response.content_part.done", sequence, **where, part=part)
        yield _event("response.output_item.done", sequence, output_index=0, item=done.output[0])
        yield _event("response.completed", sequence, response=done)

    return EventStreamResponse(events(), close=generation.close)
