"""asyncio front of the engine: a background loop steps the LLMEngine while work exists and routes each
step's outputs to the RequestStream of the client request they belong to.

A client request (one or more prompts, n samples each) is checked and queued in one synchronous call,
`submit`, so concurrent requests cannot overshoot the queue limit between a check and a queue. It is
one object, a RequestStream with one queue; closing it (client gone) aborts what is unfinished.

Threading: step() runs in a worker thread so the event loop stays responsive during a GPU step. The
scheduler is only changed between steps: new requests and aborts are queued and applied by the loop.
"""

from __future__ import annotations

import asyncio
import logging

from engine.config import EngineArgs
from engine.llm_engine import EngineDeadError, EngineStats, LLMEngine
from engine.outputs import StepOutput
from engine.request_checks import RequestError
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queue limit is reached; retry later (the server answers 429)."""


class RequestStream:
    """The outputs of one client request as (prompt index, StepOutput), until every prompt has finished.

    Raises the engine's error if it dies meanwhile. `close()` aborts the prompts still running.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, num_prompts: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[tuple[int, StepOutput] | BaseException] = asyncio.Queue()
        self.unfinished = set(range(num_prompts))

    def engine_request_id(self, prompt_index: int) -> str:
        return f"{self.request_id}-{prompt_index}"

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, StepOutput]:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()
            raise item
        index, out = item
        if out.request_finished:
            self.unfinished.discard(index)
        return index, out

    def close(self) -> None:
        """Aborts the prompts that have not finished (idempotent)."""
        for index in self.unfinished:
            self._engine._abort(self.engine_request_id(index))
        self.unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._routes: dict[str, tuple[RequestStream, int]] = {}  # engine request id -> (stream, prompt index)
        self._pending: list[tuple[str, list[int], SamplingParams, int | None]] = []
        self._pending_samples = 0
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._loop_error: str | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncEngine:
        """Loads the model (blocking; call it in a thread if the event loop must stay responsive)."""
        return cls(LLMEngine(args))

    @property
    def dead_reason(self) -> str | None:
        """Why the engine stopped: its loop failed, or the engine is dead (even while idle: a lost worker)."""
        return self._loop_error or self.engine.dead_reason

    @property
    def errored(self) -> bool:
        return self.dead_reason is not None

    @property
    def num_queued_samples(self) -> int:
        """Accepted sequences not yet running: submitted but not applied, plus the scheduler's waiting."""
        return self._pending_samples + self.engine.scheduler.num_waiting_samples

    def start(self) -> None:
        """Starts the background step loop on the running event loop."""
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams, *,
               max_queued_samples: int | None = None, prompt_param: str = "prompt",
               lora_id: int | None = None) -> RequestStream:
        """Checks and queues a request of len(prompts) x params.n sequences (lora_id: a known adapter's id).
        Raises RequestError if it can never run, QueueFullError if more than `max_queued_samples` would wait."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        for ids in prompts:
            self.engine.prepare(ids, params, prompt_param)
        samples = len(prompts) * params.n
        if max_queued_samples is not None:
            if samples > max_queued_samples:
                raise RequestError(f"the request has {samples} sequences (prompts x n), more than the server "
                                   f"queues at once ({max_queued_samples})", "n")
            if self.num_queued_samples + samples > max_queued_samples:
                raise QueueFullError(f"{self.num_queued_samples} sequences already wait for the engine "
                                     f"(the limit is {max_queued_samples})")
        self.start()
        stream = RequestStream(self, request_id, len(prompts))
        for index, ids in enumerate(prompts):
            engine_id = stream.engine_request_id(index)
            if engine_id in self._routes:
                raise RequestError(f"request id {request_id!r} is already in use")
            self._routes[engine_id] = (stream, index)
            self._pending.append((engine_id, ids, params, lora_id))
        self._pending_samples += samples
        self._wakeup.set()
        return stream

    def _abort(self, engine_request_id: str) -> None:
        if self._routes.pop(engine_request_id, None) is not None and self._wakeup is not None:
            self._aborts.append(engine_request_id)
            self._wakeup.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Stops the loop; requests still waiting for output get an error instead of hanging."""
        self._fail_all(RuntimeError("the server is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self.engine.close()

    def _fail_all(self, error: BaseException) -> None:
        streams = {stream for stream, _ in self._routes.values()}
        self._routes.clear()
        for stream in streams:
            stream.queue.put_nowait(error)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for engine_id, prompt_ids, params, lora_id in pending:
            self._pending_samples -= params.n
            if engine_id in self._routes:  # else its client left before it was queued
                self.engine.enqueue(engine_id, prompt_ids, params, lora_id)
        aborts, self._aborts = self._aborts, []
        for engine_id in aborts:
            self.engine.abort(engine_id)  # its stream is gone: nobody reads these outputs

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            stream, index = route
            stream.queue.put_nowait((index, out))
            if out.request_finished:
                del self._routes[out.request_id]

    async def _run_loop(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wakeup.clear()
                    if not self._pending and not self._aborts:
                        await self._wakeup.wait()
                    continue
                self._dispatch(await asyncio.to_thread(self.engine.step))
                await asyncio.sleep(0)  # let handlers consume outputs and enqueue new work
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine's state may be corrupt: stop, fail everyone, report unhealthy
            if not isinstance(e, EngineDeadError):
                logger.exception("engine loop died")
            self._loop_error = str(e) or type(e).__name__
            self._fail_all(EngineDeadError(f"the engine has stopped: {self.dead_reason}"))
