"""POST /v1/completions: one engine request per prompt (string, strings, token ids or lists of them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import JSONResponse, Response

from server.errors import bad_request
from server.generation import ClientDisconnected, check_output, collect, sampling_params, submit, until_disconnected
from server.logprobs import completion_logprobs
from server.prompts import encode
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from server.sse import DONE, EventStreamResponse, event
from server.state import ServerState


def _reject_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n)", "best_of")
    if req.echo and req.logprobs is not None:
        # Echoed logprobs would need the prompt's logprobs, which the engine does not compute.
        raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo")


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
    params = sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
    raw_prompts = _prompts(req)
    prompts = [await encode(tokenizer, p, req.add_special_tokens) if isinstance(p, str) else list(p)
               for p in raw_prompts]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = submit(state, engine, request_id, prompts, params, arrival)
    num_prompt_tokens = sum(len(p) for p in prompts)

    def echo_text(choice_index: int) -> str:
        if not req.echo:
            return ""
        prompt = raw_prompts[choice_index // req.n]
        return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)

    if not req.stream:
        try:
            choices = await until_disconnected(request, collect(generation, req.n))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            generation.close()
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        response = CompletionResponse(
            id=request_id, model=model,
            choices=[
                CompletionChoice(
                    index=i, text=echo_text(i) + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=completion_logprobs(tokenizer, c.token_ids, c.logprobs, 0)
                    if req.logprobs is not None else None)
                for i, c in choices.items()
            ],
            usage=Usage(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=num_prompt_tokens + completion_tokens),
        )
        return JSONResponse(response.model_dump())

    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        created = int(time.time())
        started: set[int] = set()  # choices that got their first delta (which carries the echo)
        offsets: dict[int, int] = {}  # per choice: text_offset of its next token
        completion_tokens = 0

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            payload = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
            return event(payload, exclude=None if include_usage else {"usage"})

        async for prompt_index, out in generation.outputs():
            check_output(out)
            completion_tokens += len(out.new_token_ids)
            index = prompt_index * req.n + out.index
            text = out.new_text
            if index not in started:
                started.add(index)
                text = echo_text(index) + text  # echo arrives with the first delta, as in vLLM
            if not (text or out.finished or (req.logprobs is not None and out.new_token_ids)):
                continue  # e.g. tokens held back while they might still become a stop string
            logprobs = None
            if req.logprobs is not None:
                start = offsets.get(index, 0)
                logprobs = completion_logprobs(tokenizer, out.new_token_ids, out.new_logprobs or [], start)
                offsets[index] = start + sum(len(token) for token in logprobs.tokens)
            yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=out.finish_reason if out.finished else None,
                                          stop_reason=out.stop_reason if out.finished else None)])
        if include_usage:
            yield chunk([], Usage(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=num_prompt_tokens + completion_tokens))
        yield DONE

    return EventStreamResponse(events(), close=generation.close)
