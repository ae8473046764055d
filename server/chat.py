"""POST /v1/chat/completions: messages -> chat template -> one engine request with n samples."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import JSONResponse, Response

from server.errors import bad_request
from server.generation import ClientDisconnected, check_output, collect, sampling_params, submit, until_disconnected
from server.logprobs import chat_logprobs, vllm_prompt_logprobs
from server.prompts import encode, render_chat, template_arguments
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    Usage,
)
from server.sse import DONE, EventStreamResponse, event
from server.state import ServerState


def _reject_unsupported(req: ChatCompletionRequest) -> None:
    """Features that would change the output's meaning are refused, never silently ignored."""
    if req.response_format is not None and req.response_format.type != "text":
        raise bad_request(f"response_format of type {req.response_format.type!r} is not supported yet; "
                          "only 'text' is", "response_format")
    if req.tools:
        raise bad_request("tools (function calling) are not supported yet", "tools")
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported yet (tools are not supported)", "tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


async def create_chat_completion(req: ChatCompletionRequest, request: Request, state: ServerState) -> Response:
    arrival = time.monotonic()
    model = state.check_model(req.model)
    engine = state.ready_engine()
    _reject_unsupported(req)
    tokenizer = engine.tokenizer
    top_k = req.top_logprobs or 0
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens, logprobs=top_k if req.logprobs else None,
                             prompt_logprobs=req.prompt_logprobs)
    template_kwargs = template_arguments(state.settings, req.chat_template, req.chat_template_kwargs)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    text = await render_chat(tokenizer, messages, req.add_generation_prompt, template_kwargs)
    # The template already holds the special tokens it wants (vLLM encodes chat the same way).
    prompt = await encode(tokenizer, text, add_special_tokens=False)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = submit(state, engine, request_id, [prompt], params, arrival, prompt_param="messages")
    if not req.stream:
        try:
            choices = await until_disconnected(request, collect(generation, req.n))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            generation.close()
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        response = ChatCompletionResponse(
            id=request_id, model=model,
            choices=[
                ChatChoice(
                    index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=ChatLogprobs(content=chat_logprobs(tokenizer, c.token_ids, c.logprobs, top_k))
                    if req.logprobs else None)
                for i, c in choices.items()
            ],
            usage=Usage.of(len(prompt), completion_tokens, choices[0].num_cached_tokens),
            prompt_logprobs=vllm_prompt_logprobs(tokenizer, prompt, choices[0].prompt_logprobs, req.prompt_logprobs)
            if req.prompt_logprobs is not None else None,
        )
        return JSONResponse(response.model_dump())

    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            # With include_usage, OpenAI sends "usage": null on every chunk but the last.
            payload = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return event(payload, exclude=None if include_usage else {"usage"})

        for index in range(req.n):
            yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
        completion_tokens = cached_tokens = 0
        async for _, out in generation.outputs():
            check_output(out)
            completion_tokens += len(out.new_token_ids)
            cached_tokens = out.num_cached_tokens
            if not (out.new_text or out.finished or (req.logprobs and out.new_token_ids)):
                continue  # e.g. tokens held back while they might still become a stop string
            logprobs = None
            if req.logprobs:
                logprobs = ChatLogprobs(
                    content=chat_logprobs(tokenizer, out.new_token_ids, out.new_logprobs or [], top_k))
            yield chunk([ChatChunkChoice(
                index=out.index, delta={"content": out.new_text} if out.new_text else {}, logprobs=logprobs,
                finish_reason=out.finish_reason if out.finished else None,
                stop_reason=out.stop_reason if out.finished else None)])
        if include_usage:
            yield chunk([], Usage.of(len(prompt), completion_tokens, cached_tokens))
        yield DONE

    return EventStreamResponse(events(), close=generation.close)
