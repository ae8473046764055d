"""POST /v1/completions: one engine request per prompt (string, strings, token ids or lists of them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from engine.outputs import PromptLogprobs
from server.errors import bad_request
from server.generation import (
    check_output,
    collect_unless_disconnected,
    compile_grammar,
    off_loop,
    sampling_params,
    submit,
)
from server.logprobs import completion_logprobs, echoed_prompt_logprobs, vllm_prompt_logprobs
from server.prompts import encode
from server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from server.sse import DONE, EventStreamResponse, event
from server.state import ServerState
from server.structured_outputs import requested_structured_outputs


def _reject_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n)", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1; 0 is only allowed with echo (score the prompt)",
                          "max_tokens")


def _prompt_logprobs_k(req: CompletionRequest) -> int | None:
    """How many top logprobs per prompt token the engine computes: for echoed logprobs and for vLLM's
    prompt_logprobs; echo with max_tokens 0 scores the prompt in any case."""
    wanted = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    if req.echo and req.max_tokens == 0:
        wanted.append(0)
    return max(wanted, default=None)


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each a string or token ids."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # one prompt
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    return list(prompt)


async def create_completion(req: CompletionRequest, request: Request, state: ServerState) -> Response:
    arrival = time.monotonic()
    model = state.check_model(req.model)
    engine = state.ready_engine()
    _reject_unsupported(req)
    tokenizer = engine.tokenizer
    structured, structured_param = requested_structured_outputs(req)
    params = sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                             prompt_logprobs=_prompt_logprobs_k(req), structured_outputs=structured)
    await compile_grammar(engine, params, structured_param)
    raw_prompts = _prompts(req)
    prompts = [await encode(tokenizer, p, req.add_special_tokens) if isinstance(p, str) else list(p)
               for p in raw_prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = submit(state, engine, request_id, prompts, params, arrival, model=model)
    num_prompt_tokens = sum(len(p) for p in prompts)

    def echo_text(choice_index: int) -> str:
        if not req.echo:
            return ""
        prompt = raw_prompts[choice_index // req.n]
        return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)

    def choice_logprobs(choice_index: int, token_ids: list[int], logprobs: list[dict[int, float]],
                        text_offset: int, prompt_logprobs: PromptLogprobs | None) -> CompletionLogprobs | None:
        """The logprobs of new tokens starting at text_offset; with echo, the prompt's first (when given)."""
        if req.logprobs is None:
            return None
        echoed = None
        if req.echo and prompt_logprobs is not None:
            echoed, text_offset = echoed_prompt_logprobs(tokenizer, prompts[choice_index // req.n],
                                                         prompt_logprobs, req.logprobs)
        return completion_logprobs(tokenizer, token_ids, logprobs, text_offset, after=echoed)

    def vllm_extra(choice_index: int, prompt_logprobs: PromptLogprobs | None):
        if req.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(tokenizer, prompts[choice_index // req.n], prompt_logprobs, req.prompt_logprobs)

    if not req.stream:
        choices = await collect_unless_disconnected(request, generation, req.n)
        if choices is None:
            return Response(status_code=499)
        completion_tokens = sum(len(c.token_ids) for c in choices.values())

        def response_choices() -> list[CompletionChoice]:
            # Prompt logprobs come once per prompt, with its sample 0.
            prompt_lps = {i: choices[i - i % req.n].prompt_logprobs for i in choices}
            return [CompletionChoice(
                index=i, text=echo_text(i) + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                logprobs=choice_logprobs(i, c.token_ids, c.logprobs, 0, prompt_lps[i]),
                prompt_logprobs=vllm_extra(i, prompt_lps[i])) for i, c in choices.items()]

        response = CompletionResponse(
            id=request_id, model=model,
            choices=await off_loop(response_choices),  # one text per logprob entry: long prompts take a while
            usage=Usage.of(num_prompt_tokens, completion_tokens,
                           sum(c.num_cached_tokens for i, c in choices.items() if i % req.n == 0)),
        )
        return JSONResponse(response.model_dump())

    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        created = int(time.time())
        started: set[int] = set()  # choices that got their first delta (which carries the echo)
        offsets: dict[int, int] = {}  # per choice: text_offset of its next token
        prompt_lps: dict[int, PromptLogprobs] = {}  # per prompt, from its sample 0's first output
        completion_tokens = 0
        cached_tokens: dict[int, int] = {}  # per prompt

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            payload = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
            # Streamed choices have no prompt_logprobs (refused with stream, as in vLLM).
            exclude: dict[str, Any] = {"choices": {"__all__": {"prompt_logprobs"}}}
            return event(payload, exclude=exclude if include_usage else {**exclude, "usage": True})

        async for prompt_index, out in generation.outputs():
            check_output(out)
            completion_tokens += len(out.new_token_ids)
            cached_tokens[prompt_index] = out.num_cached_tokens
            index = prompt_index * req.n + out.index
            if out.prompt_logprobs is not None:
                prompt_lps[prompt_index] = out.prompt_logprobs
            text, echoed = out.new_text, None
            if index not in started:
                started.add(index)
                text = echo_text(index) + text  # echo arrives with the first delta, as in vLLM
                echoed = prompt_lps.get(prompt_index)  # ... and so do the echoed prompt's logprobs
            if not (text or out.finished or (req.logprobs is not None and out.new_token_ids)):
                continue  # e.g. tokens held back while they might still become a stop string
            new = (index, out.new_token_ids, out.new_logprobs or [], offsets.get(index, 0), echoed)
            # The echoed prompt's entries take one token text each: off the event loop.
            logprobs = await off_loop(choice_logprobs, *new) if echoed else choice_logprobs(*new)
            if logprobs is not None and logprobs.tokens:
                offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=out.finish_reason if out.finished else None,
                                          stop_reason=out.stop_reason if out.finished else None)])
        if include_usage:
            yield chunk([], Usage.of(num_prompt_tokens, completion_tokens, sum(cached_tokens.values())))
        yield DONE

    return EventStreamResponse(events(), close=generation.close)
