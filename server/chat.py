"""POST /v1/chat/completions: messages -> chat template -> one engine request with n samples."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import JSONResponse, Response

from server.errors import bad_request
from server.generation import (
    Choice,
    check_output,
    collect_unless_disconnected,
    compile_grammar,
    sampling_params,
    submit,
)
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
    FunctionCall,
    ToolCall,
    Usage,
)
from server.sse import DONE, EventStreamResponse, event
from server.state import ServerState
from server.structured_outputs import requested_structured_outputs
from server.tool_calls import check_template_kept_tools, plan_chat_tools, template_messages, with_tools


def _reject_unsupported(req: ChatCompletionRequest) -> None:
    """Features that would change the output's meaning are refused, never silently ignored."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


async def create_chat_completion(req: ChatCompletionRequest, request: Request, state: ServerState) -> Response:
    arrival = time.monotonic()
    model = state.check_model(req.model)
    engine = state.ready_engine()
    _reject_unsupported(req)
    tokenizer = engine.tokenizer
    tools = plan_chat_tools(req, state.settings, tokenizer)
    structured, structured_param = requested_structured_outputs(req)
    if tools is not None and structured is not None:
        raise bad_request("response_format or structured outputs cannot be combined with tool calls; use "
                          'tool_choice "none"', "tool_choice")
    top_k = req.top_logprobs or 0
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens, logprobs=top_k if req.logprobs else None,
                             prompt_logprobs=req.prompt_logprobs,
                             structured_outputs=tools.structured_outputs if tools else structured,
                             skip_special_tokens=False if tools and tools.parser.special_tags else None)
    await compile_grammar(engine, params, "tools" if tools else structured_param)
    template_kwargs = with_tools(template_arguments(state.settings, req.chat_template, req.chat_template_kwargs),
                                 req.tools)
    text = await render_chat(tokenizer, template_messages(req.messages), req.add_generation_prompt, template_kwargs)
    check_template_kept_tools(req.messages, text)
    # The template already holds the special tokens it wants (vLLM encodes chat the same way).
    prompt = await encode(tokenizer, text, add_special_tokens=False)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = submit(state, engine, request_id, [prompt], params, arrival, prompt_param="messages",
                        model=model)
    if not req.stream:
        choices = await collect_unless_disconnected(request, generation, req.n)
        if choices is None:
            return Response(status_code=499)
        completion_tokens = sum(len(c.token_ids) for c in choices.values())

        def choice(i: int, c: Choice) -> ChatChoice:
            content, calls = tools.parser.extract(c.text) if tools else (c.text, [])
            return ChatChoice(
                index=i, finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                message=AssistantMessage(content=content, tool_calls=[
                    ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                    for call in calls]),
                stop_reason=c.stop_reason,
                logprobs=ChatLogprobs(content=chat_logprobs(tokenizer, c.token_ids, c.logprobs, top_k))
                if req.logprobs else None)

        response = ChatCompletionResponse(
            id=request_id, model=model, choices=[choice(i, c) for i, c in choices.items()],
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
        streamers = [tools.parser.streamer() for _ in range(req.n)] if tools else None
        async for _, out in generation.outputs():
            check_output(out)
            completion_tokens += len(out.new_token_ids)
            cached_tokens = out.num_cached_tokens
            if streamers:
                deltas = streamers[out.index].feed(out.new_text, final=out.finished)
            else:
                deltas = [{"content": out.new_text}] if out.new_text else []
            if not (deltas or out.finished or (req.logprobs and out.new_token_ids)):
                continue  # e.g. tokens held back while they might still become a stop string
            logprobs = None
            if req.logprobs:
                logprobs = ChatLogprobs(
                    content=chat_logprobs(tokenizer, out.new_token_ids, out.new_logprobs or [], top_k))
            finish_reason = out.finish_reason if out.finished else None
            if finish_reason == "stop" and streamers and streamers[out.index].calls:
                finish_reason = "tool_calls"
            deltas = deltas or [{}]
            for j, delta in enumerate(deltas):
                last = j == len(deltas) - 1
                yield chunk([ChatChunkChoice(
                    index=out.index, delta=delta, logprobs=logprobs if j == 0 else None,
                    finish_reason=finish_reason if last else None,
                    stop_reason=out.stop_reason if out.finished and last else None)])
        if include_usage:
            yield chunk([], Usage.of(len(prompt), completion_tokens, cached_tokens))
        yield DONE

    return EventStreamResponse(events(), close=generation.close)
