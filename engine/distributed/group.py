"""The tensor-parallel process group: which rank this process is, and the collectives the models call.

Every rank holds one shard of each weight and runs the same forward on the same flat batch. Sharded
activations meet in two collectives: an all-reduce (sum) after each row-parallel projection, and an
all-gather of the vocabulary-parallel logits. NCCL on CUDA, gloo on CPU (the tests); at size 1 both are
no-ops, so the models run the same code with and without tensor parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)  # a rank waits this long in a collective for the slowest (weights load unevenly)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (row-parallel outputs: each rank holds a partial sum)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[S, n] on each rank -> [S, size * n], rank r's columns at r * n (vocabulary-parallel logits)."""
        if self.size == 1:
            return x
        out = x.new_empty(self.size * x.shape[0], x.shape[1])  # the ranks' [S, n] stacked (gloo: not [size, S, n])
        dist.all_gather_single(out, x.contiguous())
        return out.view(self.size, *x.shape).permute(1, 0, 2).reshape(x.shape[0], self.size * x.shape[1])

    def min_over_ranks(self, values: list[int]) -> list[int]:
        """Element-wise minimum over the ranks (the memory plan: the tightest rank sizes every pool)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.long, device=backend_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.tolist()


SINGLE = TensorParallel()


def backend_device() -> torch.device:
    """Where collective inputs must live: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on GPU r of the host (rank 0 on the device the engine was given)."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_tensor_parallel(rank: int, size: int, port: int, device: torch.device) -> TensorParallel:
    """Joins the process group of `size` ranks that rank 0 rendezvous on 127.0.0.1:port."""
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the device's NCCL setting)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    return TensorParallel(rank, size)


def abort_collectives() -> None:
    """Unblocks a collective that waits for a dead rank. gloo fails it by itself (the peer's sockets
    close); NCCL would wait out TIMEOUT, so its communicators are aborted."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # aborted after a rank died: nothing left to destroy cleanly
            pass
