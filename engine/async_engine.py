"""asyncio front of the engine: a background loop steps the LLMEngine while work exists and routes each
step's outputs to per-request queues. Closing a generate() iterator (client gone) aborts the request.

Threading: step() runs in a worker thread so the event loop stays responsive during a GPU step. The
scheduler is only touched between steps: new requests and aborts are queued and applied by the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from engine.config import EngineArgs
from engine.llm_engine import EngineStats, LLMEngine
from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._queues: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._pending: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.errored = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncEngine:
        """Loads the model (blocking; call it in a thread if the event loop must stay responsive)."""
        return cls(LLMEngine(args))

    def start(self) -> None:
        """Starts the background step loop on the running event loop."""
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[StepOutput]:
        """Yields the request's StepOutputs (all n samples) until it finishes.

        Raises ValueError before yielding anything if the request can never run.
        """
        if self.errored:
            raise RuntimeError("the engine loop has stopped after an internal error")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.engine.tokenize_prompt(prompt)
        self.engine.validate(prompt_ids, params)
        self.start()
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending.append((request_id, prompt_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.request_finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # cancelled or closed early: the client is gone
                self._aborts.append(request_id)
                self._wakeup.set()

    async def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Stops the loop; requests still waiting for output get an error instead of hanging."""
        for queue in self._queues.values():
            queue.put_nowait(RuntimeError("the engine is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
            self._loop_task = None

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for request_id, prompt_ids, params in pending:
            if request_id not in self._queues:  # its client left before it was admitted
                continue
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as e:
                self._queues[request_id].put_nowait(e)
        aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            self._dispatch(self.engine.abort(request_id))

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

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
        except BaseException as e:  # a bug in the loop itself: fail everyone, report unhealthy
            logger.exception("engine loop died")
            self.errored = True
            for queue in self._queues.values():
                queue.put_nowait(RuntimeError(f"engine loop died: {e}"))
