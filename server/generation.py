"""From an HTTP request to one engine request and back: sampling parameters, prompts prepared off the
event loop, admission, disconnects, merged outputs.

Handlers build `SamplingParams` and prompts (token ids), then `submit(...)` checks and queues them in
one step (400 for what can never run, 429 when the queue is full) and returns a `Generation`: one
object per request, yielding (prompt index, StepOutput) for all its prompts; closing it aborts what
is unfinished. A client disconnect is noticed one way, by the ASGI `http.disconnect` message.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from engine.async_engine import QueueFullError
from engine.llm_engine import EngineDeadError
from engine.outputs import PromptLogprobs, StepOutput
from engine.request_checks import RequestError
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutputsParams
from server.errors import APIError, bad_request
from server.metrics import RequestMetrics
from server.protocol import SamplingFields

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine, RequestStream
    from server.state import ServerState

T = TypeVar("T")

RETRY_AFTER_S = 1

# Tokenizing and rendering chat templates take CPU time proportional to the input: they run here, not on
# the event loop (the tokenizer releases the GIL; see engine.tokenizer.Tokenizer.encode).
_preprocess_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="falcon-serve-preprocess")


async def off_loop(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_preprocess_pool, functools.partial(fn, *args, **kwargs))


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None, structured_outputs: StructuredOutputsParams | None = None,
                    skip_special_tokens: bool | None = None) -> SamplingParams:
    """SamplingParams from the request; unset fields keep the engine's defaults. Bad values -> 400.
    skip_special_tokens overrides the request's (tool-call tags that are special tokens must stay)."""
    if req.stream and req.prompt_logprobs is not None:  # vLLM refuses this too: they would have no chunk
        raise bad_request("prompt_logprobs are not available when stream is true", "prompt_logprobs")
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
        "skip_special_tokens": req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
        "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "structured_outputs": structured_outputs,
    }
    # max_tokens=None is meaningful (up to max_model_len); the other Nones mean "not given".
    kwargs = {k: v for k, v in values.items() if v is not None or k == "max_tokens"}
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        # SamplingParams messages start with the offending field's name.
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), name if name in values else None) from None


async def compile_grammar(engine: AsyncEngine, params: SamplingParams, param: str | None) -> None:
    """Compiles the request's grammar off the event loop (llguidance caches it, so submit's own check finds
    it compiled). An invalid schema or grammar -> 400 naming `param`, the field it came from."""
    if params.structured_outputs is None:
        return
    try:
        await off_loop(engine.engine.check_grammar, params)
    except RequestError as e:
        raise bad_request(str(e), param) from None


@dataclass
class Generation:
    """One submitted request: its engine stream and the metrics of each of its prompts."""

    stream: RequestStream
    records: list[RequestMetrics]

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        try:
            async for index, out in self.stream:
                self.records[index].on_output(out)
                yield index, out
        except EngineDeadError as e:
            raise APIError(503, str(e)) from None

    def close(self) -> None:
        self.stream.close()
        for record in self.records:
            record.close()


def submit(state: ServerState, engine: AsyncEngine, request_id: str, prompts: list[list[int]],
           params: SamplingParams, arrival: float, prompt_param: str = "prompt", model: str | None = None
           ) -> Generation:
    """Checks and queues the request for `model` (the base model or a LoRA adapter's name, as check_model
    returned it): 404 if that adapter is gone, 400 if it can never run, 429 when the queue is full."""
    lora_id = state.lora_id(model)
    try:
        stream = engine.submit(request_id, prompts, params, max_queued_samples=state.settings.max_queue_len,
                               prompt_param=prompt_param, lora_id=lora_id)
    except RequestError as e:
        raise bad_request(str(e), e.param) from None
    except QueueFullError as e:
        raise APIError(429, f"The server is busy: {e}. Retry later.", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineDeadError as e:
        raise APIError(503, f"The engine has stopped: {e}") from None
    return Generation(stream, [RequestMetrics(state.metrics, arrival, len(p), params.n) for p in prompts])


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has gone (the request body has been read before this is called)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits `awaitable`, cancelling it (so aborting its engine work) if the client goes away."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def check_output(out: StepOutput) -> None:
    """A request that failed inside the engine fails with a 500 (the engine keeps serving the others)."""
    if out.error is not None:
        raise APIError(500, f"The engine failed while generating this request: {out.error}")


@dataclass
class Choice:
    """Accumulated output of one choice (one sample of one prompt)."""

    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on sample 0 of each prompt, when asked for
    num_cached_tokens: int = 0  # of its prompt, served by the prefix cache

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, out: StepOutput) -> None:
        check_output(out)
        self.token_ids += out.new_token_ids
        self.text_parts.append(out.new_text)
        self.logprobs += out.new_logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


async def collect_unless_disconnected(request: Request, generation: Generation, n: int) -> dict[int, Choice] | None:
    """Runs a non-streamed request to the end; None if the client left first (its work is then aborted)."""
    try:
        return await until_disconnected(request, collect(generation, n))
    except ClientDisconnected:
        return None
    finally:
        generation.close()


async def collect(generation: Generation, n: int) -> dict[int, Choice]:
    """Runs a non-streamed request to the end; choices keyed by prompt_index * n + sample index."""
    choices: dict[int, Choice] = {}
    try:
        async for i, out in generation.outputs():
            choices.setdefault(i * n + out.index, Choice()).add(out)
    finally:
        generation.close()
    return dict(sorted(choices.items()))
