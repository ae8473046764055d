"""The device's two ceilings, measured in the same run as the benchmark that divides by them:
HBM bandwidth from a large device-to-device copy (bytes read + bytes written), and the dense bf16
matmul rate from a large square product on random data (zeros run faster than real data)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from triton.testing import do_bench


@dataclass
class Ceilings:
    hbm_bytes_per_s: float
    bf16_flops: float

    def describe(self) -> str:
        return (f"measured ceilings: {self.hbm_bytes_per_s / 1e12:.2f} TB/s device-to-device copy (read + write), "
                f"{self.bf16_flops / 1e12:.0f} TFLOP/s dense bf16 matmul")


def median_seconds(fn) -> float:
    """One call's median time (do_bench: CUDA events, L2 flushed before every call)."""
    return do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e3


def sustained_seconds(fn, calls: int = 20, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls between two CUDA events, after as
    many calls of warm-up: the rate the device sustains."""
    for _ in range(calls):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph holding fn() (a sequence of launches), warmed up (compiled) on a side stream before the
    capture and replayed once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_replay_seconds(fn, reps: int) -> float:
    """Mean seconds of one replay of a CUDA graph holding fn() (see capture_graph)."""
    return replay_seconds(capture_graph(fn), reps)


def replay_seconds(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Mean seconds of one of `reps` back-to-back replays of graph, after one untimed replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_bytes_per_s(nbytes: int = 2 << 30) -> float:
    """dst.copy_(src) over nbytes of fp32, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / sustained_seconds(lambda: dst.copy_(src))


def matmul_flops(n: int = 8192) -> float:
    """An n x n x n bf16 matmul (cuBLAS) on random inputs."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / sustained_seconds(lambda: a @ b)


def measure_ceilings() -> Ceilings:
    """Both ceilings; their buffers are freed before the benchmark proper."""
    ceilings = Ceilings(hbm_bytes_per_s=copy_bytes_per_s(), bf16_flops=matmul_flops())
    torch.cuda.empty_cache()
    return ceilings
