"""The worker processes of tensor parallelism: ranks 1..N-1, each running its shard of the model.

Rank 0 (the engine's process: HTTP layer, scheduler, sampling) spawns them, then every ModelRunner call
that touches the model or its caches is sent to all of them first (`on_all_ranks`), so every rank runs
the same forward on the same flat batch and meets the others in the same collectives. Calls travel
through one pipe per worker, pickled once: an idle server keeps its workers waiting on a pipe, not in a
collective that could time out.

Workers die with rank 0: a closed pipe ends their loop, and a watchdog thread exits the process when
its parent is gone (killed with SIGKILL: no pipe is closed cleanly then). Rank 0 watches its workers:
when one exits, `failure` says which and how, and the engine reports itself dead.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import pickle
import socket
import threading
import time
from multiprocessing.connection import Connection, wait

import torch

from engine.distributed.group import abort_collectives, destroy_tensor_parallel, init_tensor_parallel, rank_device

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited: the model is no longer whole."""


def on_all_ranks(method):
    """A ModelRunner method every rank runs with the same arguments: rank 0 sends them to the workers first
    (which run it without sending further: they have no workers)."""

    @functools.wraps(method)
    def run(runner, *args):
        if runner.workers is not None:
            runner.workers.send(method.__name__, args)
        return method(runner, *args)

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """Rank 0's handle on ranks 1..size-1: starts them, sends them each call, watches them."""

    def __init__(self, size: int, device: torch.device, runner_args: tuple):
        """runner_args: what each worker builds its ModelRunner from (as rank 0's, plus its rank)."""
        self.port = _free_port()
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self.failure: str | None = None
        self._closing = False
        self._pipes: list[Connection] = []
        self.processes: list[mp.Process] = []
        for rank in range(1, size):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(target=worker_main, name=f"falcon-serve-tp{rank}", daemon=True,
                                  args=(rank, size, self.port, device, runner_args, reader, os.getpid(),
                                        logging.getLogger().level))
            process.start()
            reader.close()
            self._pipes.append(writer)
            self.processes.append(process)
        logger.info("tensor parallelism: %d ranks, workers %s", size, [p.pid for p in self.processes])
        threading.Thread(target=self._watch, name="falcon-serve-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        ready = wait([p.sentinel for p in self.processes])
        if self._closing:
            return
        rank, process = next((rank, p) for rank, p in enumerate(self.processes, start=1) if p.sentinel in ready)
        deadline = time.monotonic() + 2.0
        while process.exitcode is None and time.monotonic() < deadline:  # another thread may be reaping it
            process.join(0.05)
        self.failure = f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
        logger.error("%s: the engine cannot continue", self.failure)
        abort_collectives()

    def send(self, name: str, args: tuple) -> None:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)
        message = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for pipe in self._pipes:
                pipe.send_bytes(message)
        except OSError as e:  # the worker's end is gone: it died (the watcher names it)
            time.sleep(0.1)
            raise WorkerDiedError(self.failure or f"a tensor-parallel worker is gone ({e})") from None

    def close(self) -> None:
        """Asks the workers to stop, and ends those that do not within JOIN_TIMEOUT_S."""
        self._closing = True
        for pipe in self._pipes:
            try:
                pipe.send_bytes(pickle.dumps(("shutdown", ())))
            except OSError:
                pass
            pipe.close()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in self.processes:
            p.join(max(deadline - time.monotonic(), 0))
            if p.is_alive():
                logger.warning("tensor-parallel worker %s did not stop; killing it", p.pid)
                p.kill()
                p.join()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def worker_main(rank: int, size: int, port: int, device: torch.device, runner_args: tuple, pipe: Connection,
                parent_pid: int, log_level: int) -> None:
    """A worker: joins the group, loads its shard (the same ModelRunner start-up as rank 0, in lockstep),
    then runs each call rank 0 sends until told to stop or rank 0 is gone."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if device.type == "cpu":  # share the cores with rank 0 rather than oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    from engine.model_runner import ModelRunner  # here: the runner module imports this one

    tp = init_tensor_parallel(rank, size, port, rank_device(device, rank))
    runner = ModelRunner(*runner_args, tp=tp)
    while True:
        try:
            name, args = pickle.loads(pipe.recv_bytes())
        except EOFError:  # rank 0 closed its end without a word: it is gone
            break
        if name == "shutdown":
            break
        getattr(runner, name)(*args)
    destroy_tensor_parallel()
