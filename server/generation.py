"""From an HTTP request to engine requests and back: sampling parameters, admission, merged outputs.

Handlers turn their request into prompts (token ids) and `SamplingParams`, then iterate
`generate(...)`, which yields (prompt index, StepOutput) for all prompts of the request. Leaving
that iteration early (client gone, error) aborts every engine request it started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams
from server.errors import APIError, bad_request
from server.metrics import RequestMetrics
from server.protocol import SamplingFields

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from server.state import ServerState

T = TypeVar("T")

DISCONNECT_POLL_S = 0.25
RETRY_AFTER_S = 1


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """SamplingParams from the request; unset fields keep the engine's defaults. Bad values -> 400."""
    logit_bias = None
    if req.logit_bias is not None:
        try:
            logit_bias = {int(token): bias for token, bias in req.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
    values = {
        "n": req.n, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
        "top_k": req.top_k, "min_p": req.min_p, "seed": req.seed, "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty, "repetition_penalty": req.repetition_penalty,
        "min_tokens": req.min_tokens, "logit_bias": logit_bias, "stop": req.stop,
        "stop_token_ids": req.stop_token_ids, "ignore_eos": req.ignore_eos,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens, "logprobs": logprobs,
    }
    # max_tokens=None is meaningful (up to max_model_len); the other Nones mean "not given".
    kwargs = {k: v for k, v in values.items() if v is not None or k == "max_tokens"}
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        # SamplingParams messages start with the offending field's name.
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), name if name in values else None) from None


def check_fits(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, prompt_param: str) -> None:
    """400 for prompts that can never run, with the numbers (vLLM's wording)."""
    if num_prompt_tokens == 0:
        raise bad_request(f"{prompt_param} is empty: it must encode to at least one token", prompt_param)
    if max_tokens is None and num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for a completion. Please shorten the prompt.",
            prompt_param)
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            "max_tokens")


def admit(state: ServerState, engine: AsyncEngine) -> None:
    """429 when --max-queue-len requests already wait for the engine."""
    limit = state.settings.max_queue_len
    if limit is not None and engine.stats().num_waiting >= limit:
        raise APIError(429, f"The server is busy: {limit} requests are already waiting. Retry later.",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


async def _tracked(state: ServerState, engine: AsyncEngine, request_id: str, prompt: list[int],
                   params: SamplingParams, arrival: float) -> AsyncIterator[StepOutput]:
    record = RequestMetrics(state.metrics, arrival, len(prompt), params.n)
    rejected = False
    try:
        async for out in engine.generate(request_id, prompt, params):
            record.on_output(out)
            yield out
    except ValueError:
        rejected = True  # refused before it ran: not a request as far as the metrics go
        raise
    finally:
        if not rejected:
            record.close()


async def generate(state: ServerState, engine: AsyncEngine, request_id: str, prompts: list[list[int]],
                   params: SamplingParams, arrival: float) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of all prompts as they come, tagged with the prompt's index. Engine ValueError -> 400."""
    queue: asyncio.Queue[tuple[int, StepOutput | None, Exception | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in _tracked(state, engine, f"{request_id}-{i}", prompts[i], params, arrival):
                queue.put_nowait((i, out, None))
        except Exception as e:
            queue.put_nowait((i, None, e))
        else:
            queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, error = await queue.get()
            if isinstance(error, ValueError):
                raise bad_request(str(error)) from error
            if error is not None:
                raise error
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        # Cancelling a pump closes its engine.generate, which aborts the request and frees its memory.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and so aborting its engine work) if the client goes away."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def primed(request: Request, stream: AsyncIterator[T]) -> AsyncIterator[T] | None:
    """Wait for the first output before a streamed response sends its headers, so that a request the
    engine refuses is still a plain 4xx. None if the client left meanwhile (the stream is then closed)."""
    try:
        first = await until_disconnected(request, anext(stream))
    except ClientDisconnected:
        return None

    async def first_then_rest() -> AsyncIterator[T]:
        yield first
        async for item in stream:
            yield item

    return first_then_rest()


def check_output(out: StepOutput) -> None:
    """A step that failed inside the engine fails its request with a 500 (the engine keeps serving)."""
    if out.error is not None:
        raise APIError(500, f"The engine failed while generating: {out.error}")


@dataclass
class Choice:
    """Accumulated output of one choice (one sample of one prompt)."""

    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, out: StepOutput) -> None:
        check_output(out)
        self.token_ids += out.new_token_ids
        self.text_parts.append(out.new_text)
        self.logprobs += out.new_logprobs or []
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


async def collect(stream: AsyncIterator[tuple[int, StepOutput]], n: int) -> dict[int, Choice]:
    """Run a non-streamed request to the end; choices keyed by prompt_index * n + sample index."""
    choices: dict[int, Choice] = {}
    async with aclosing(stream):
        async for i, out in stream:
            choices.setdefault(i * n + out.index, Choice()).add(out)
    return dict(sorted(choices.items()))
