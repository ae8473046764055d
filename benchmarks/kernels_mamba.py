"""GPU benchmark of the Mamba Triton kernels at Falcon-H1-7B (Mamba2) and FalconMamba-7B (Mamba1) shapes.

Decode kernels (conv update, Mamba2 state update, Mamba1 step) at 1, 32 and 256 sequences are memory-bound:
bytes moved = state read + write + per-token inputs/outputs (weights, A, D, dt_bias are L2-resident and not
counted), against the device-to-device copy rate. Prefill kernels at 4,096 tokens (one sequence, and 16 x 256):
the SSD scan's FLOPs (causal intra-chunk CB and CB@x, C@S_in, chunk states) against the dense bf16 matmul rate.
Both ceilings are measured first, in the same run (benchmarks/ceilings.py). The conv prefill also runs on x as
the engine passes it: a column slice of the in_proj output, whose row stride is no multiple of 16 elements.

Times: triton.testing.do_bench's median, which flushes L2 before every call; calls also cycle through
disjoint slot sets with their own inputs (up to 4x the 50 MB L2 together). Rates use this time. For
reference, the mean of the same calls replayed back to back from one CUDA graph (how decode runs in the
server; no launch gaps, but states under ~1 MB a call can stay in L2 across the cycle).

    python -m benchmarks.kernels_mamba --out bench.md [--only mamba1-prefill,mamba1-step]

--mamba1-sweep instead times a few blockings of the Mamba1 prefill scan (tokens a tile, warps, channels a
thread, chains) at FalconMamba-7B shapes, each checked against the reference first, as CUDA-graph replay
medians; --before-src DIR also times DIR/kernels/selective_scan.py (e.g. a checkout of main) in the same run.

    python -m benchmarks.kernels_mamba --mamba1-sweep [--before-src .dev_s9/main] [--out sweep.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from triton.testing import do_bench

from benchmarks.ceilings import Ceilings, capture_graph, graph_replay_seconds, measure_ceilings, sustained_seconds
from kernels.conv1d import causal_conv1d_update, causal_conv1d_varlen
from kernels.selective_scan import (
    PrefillBlocking,
    selective_scan_update,
    selective_scan_varlen,
    selective_scan_varlen_ref,
)
from kernels.ssd_scan import ssd_scan_varlen
from kernels.ssm_state_update import ssm_state_update

H1_7B = dict(H=24, P=128, G=1, N=256, K=4, chunk=256)  # Falcon-H1-7B: d_ssm 3072, conv_dim 3072 + 2*G*N
MAMBA_7B = dict(C=8192, N=16, K=4)  # FalconMamba-7B: d_inner 8192
L2_DEFEAT_BYTES = 200 * 2**20
DTYPE = torch.bfloat16
DEV = "cuda"


@dataclass
class Row:
    kernel: str
    size: str
    eager_us: float
    graph_us: float
    bytes: float
    flops: float = 0.0


def timed(calls: list[Callable[[], object]], graph_calls: int = 64) -> tuple[float, float]:
    """(do_bench median, CUDA-graph mean) in microseconds of one call, cycling through `calls`."""
    state = {"i": 0}

    def next_call() -> None:
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    eager = do_bench(next_call, warmup=25, rep=200, return_mode="median") * 1e3
    graph_s = graph_replay_seconds(lambda: [next_call() for _ in range(graph_calls)], reps=10)
    return eager, graph_s * 1e6 / graph_calls


def rotations(bytes_per_call: float) -> int:
    """Disjoint slot sets to cycle through so consecutive calls miss in L2."""
    return max(2, min(64, math.ceil(L2_DEFEAT_BYTES / bytes_per_call)))


def slot_sets(batch: int, rot: int) -> list[torch.Tensor]:
    perm = torch.randperm(batch * rot, device=DEV).to(torch.int32)
    return list(perm.view(rot, batch))


def bench_conv_update(batch: int) -> Row:
    C, K = H1_7B["H"] * H1_7B["P"] + 2 * H1_7B["G"] * H1_7B["N"], H1_7B["K"]
    nbytes = 2 * batch * C * (K - 1) * DTYPE.itemsize + 2 * batch * C * DTYPE.itemsize
    rot = rotations(nbytes)
    states = torch.randn(batch * rot, C, K - 1, device=DEV, dtype=DTYPE)
    weight = torch.randn(C, K, device=DEV, dtype=DTYPE)
    bias = torch.randn(C, device=DEV, dtype=DTYPE)
    calls = []
    for slots in slot_sets(batch, rot):
        x = torch.randn(batch, C, device=DEV, dtype=DTYPE)
        calls.append(lambda x=x, slots=slots: causal_conv1d_update(x, weight, bias, states, slots))
    return Row("conv1d update (H1-7B)", f"{batch} seqs x C={C}", *timed(calls), nbytes)


def mamba2_params(H: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = -torch.rand(H, device=DEV) * 4 - 0.1
    D = torch.randn(H, device=DEV)
    dt_bias = torch.randn(H, device=DEV) - 2
    return A, D, dt_bias


def bench_ssm_state_update(batch: int) -> Row:
    H, P, G, N = (H1_7B[k] for k in "HPGN")
    io = DTYPE.itemsize
    nbytes = batch * (2 * H * P * N * 4 + 2 * H * P * io + 2 * G * N * io + H * io)
    rot = rotations(nbytes)
    states = torch.randn(batch * rot, H, P, N, device=DEV)
    A, D, dt_bias = mamba2_params(H)
    calls = []
    for slots in slot_sets(batch, rot):
        x = torch.randn(batch, H, P, device=DEV, dtype=DTYPE)
        dt = torch.randn(batch, H, device=DEV, dtype=DTYPE)
        B, C = (torch.randn(batch, G, N, device=DEV, dtype=DTYPE) for _ in range(2))
        calls.append(lambda x=x, dt=dt, B=B, C=C, slots=slots: ssm_state_update(
            x, dt, A, B, C, D, dt_bias, (0.0, math.inf), states, slots))
    return Row("Mamba2 state update (H1-7B, fp32 state)", f"{batch} seqs x {H}x{P}x{N}", *timed(calls), nbytes)


def mamba1_params(C: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = -torch.rand(C, N, device=DEV) * 2 - 0.05
    D = torch.randn(C, device=DEV)
    dt_bias = torch.randn(C, device=DEV) - 2
    return A, D, dt_bias


def bench_selective_scan_update(batch: int) -> Row:
    C, N = MAMBA_7B["C"], MAMBA_7B["N"]
    io = DTYPE.itemsize
    nbytes = batch * (2 * C * N * 4 + 4 * C * io + 2 * N * io)
    rot = rotations(nbytes)
    states = torch.randn(batch * rot, C, N, device=DEV)
    A, D, dt_bias = mamba1_params(C, N)
    calls = []
    for slots in slot_sets(batch, rot):
        x, dt, z = (torch.randn(batch, C, device=DEV, dtype=DTYPE) for _ in range(3))
        B, Cm = (torch.randn(batch, N, device=DEV, dtype=DTYPE) for _ in range(2))
        calls.append(lambda x=x, dt=dt, z=z, B=B, Cm=Cm, slots=slots: selective_scan_update(
            x, dt, A, B, Cm, D, dt_bias, z, states, slots))
    return Row("Mamba1 step (FalconMamba-7B, fp32 state)", f"{batch} seqs x {C}x{N}", *timed(calls), nbytes)


def varlen_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    slots = torch.arange(len(lengths), dtype=torch.int32, device=DEV)
    init = torch.ones(len(lengths), dtype=torch.bool, device=DEV)
    return qsl, slots, init


def ssd_flops(lengths: list[int], H: int, P: int, G: int, N: int, chunk: int) -> float:
    """Useful FLOPs of the chunked scan: per chunk of L tokens, causal CB (per group) and CB@x (per head),
    C@S_in and the chunk state (per head)."""
    total = 0.0
    for n in lengths:
        for start in range(0, n, chunk):
            L = min(chunk, n - start)
            causal = L * (L + 1) / 2
            total += G * 2 * N * causal + H * (2 * P * causal + 2 * L * N * P + 2 * L * P * N)
    return total


def bench_ssd(lengths: list[int]) -> Row:
    H, P, G, N, chunk = (H1_7B[k] for k in ("H", "P", "G", "N", "chunk"))
    T = sum(lengths)
    x = torch.randn(T, H, P, device=DEV, dtype=DTYPE)
    dt = torch.randn(T, H, device=DEV, dtype=DTYPE)
    B, C = (torch.randn(T, G, N, device=DEV, dtype=DTYPE) for _ in range(2))
    A, D, dt_bias = mamba2_params(H)
    states = torch.randn(len(lengths), H, P, N, device=DEV)
    qsl, slots, init = varlen_batch(lengths)
    io = DTYPE.itemsize
    nbytes = T * (2 * H * P + 2 * G * N + H) * io + 2 * len(lengths) * H * P * N * 4
    call = lambda: ssd_scan_varlen(x, dt, A, B, C, D, dt_bias, (0.0, math.inf), states, qsl, slots, init, chunk)  # noqa: E731
    size = f"{len(lengths)} x {lengths[0]} tokens" if len(lengths) > 1 else f"{T} tokens"
    return Row("Mamba2 SSD prefill (H1-7B, chunk 256)", size, *timed([call], graph_calls=8), nbytes,
               ssd_flops(lengths, H, P, G, N, chunk))


def mamba1_prefill_inputs(lengths: list[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    """FalconMamba-7B scan inputs ((x, dt, A, B, C, D, dt_bias, z), states, qsl, slots, init) for `lengths`."""
    C, N = MAMBA_7B["C"], MAMBA_7B["N"]
    T = sum(lengths)
    x, dt, z = (torch.randn(T, C, device=DEV, dtype=DTYPE) for _ in range(3))
    B, Cm = (torch.randn(T, N, device=DEV, dtype=DTYPE) for _ in range(2))
    A, D, dt_bias = mamba1_params(C, N)
    states = torch.randn(len(lengths), C, N, device=DEV)
    return (x, dt, A, B, Cm, D, dt_bias, z), states, *varlen_batch(lengths)


def bench_selective_scan(lengths: list[int]) -> Row:
    C, N = MAMBA_7B["C"], MAMBA_7B["N"]
    T = sum(lengths)
    args, states, qsl, slots, init = mamba1_prefill_inputs(lengths)
    nbytes = T * (4 * C + 2 * N) * DTYPE.itemsize + 2 * len(lengths) * C * N * 4
    call = lambda: selective_scan_varlen(*args, states, qsl, slots, init)  # noqa: E731
    size = f"{len(lengths)} x {lengths[0]} tokens" if len(lengths) > 1 else f"{T} tokens"
    return Row("Mamba1 scan prefill (FalconMamba-7B)", size, *timed([call], graph_calls=8), nbytes)


def graph_median_us(call: Callable[[], object], calls_per_graph: int = 8) -> float:
    """One call's time (us) from replays of a CUDA graph of calls_per_graph back-to-back calls: the median over
    9 repeats of the mean of 5 replays."""
    graph = capture_graph(lambda: [call() for _ in range(calls_per_graph)])
    return sustained_seconds(graph.replay, calls=5, repeats=9) * 1e6 / calls_per_graph


# The prefill blockings the sweep times; the first is the default.
MAMBA1_BLOCKINGS = [PrefillBlocking(), PrefillBlocking(tile=4), PrefillBlocking(chains=65536),
                    PrefillBlocking(warps=2), PrefillBlocking(tile=2, channels_per_thread=2, chains=131072)]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("selective_scan_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def sweep_selective_scan(before_src: str | None) -> str:
    """Markdown table: each blocking (and `before`) at 4,096 x 1 and 16 x 256 tokens, first checked against
    the reference (max error relative to max |ref| of y and of the final states), then timed."""
    cases = []
    for lengths in ([4096], [256] * 16):
        args, states, qsl, slots, init = mamba1_prefill_inputs(lengths)
        init[::2] = False  # half the sequences from zeros
        ref_states = states.clone()
        ref = selective_scan_varlen_ref(*args, ref_states, qsl, slots, init)
        cases.append((f"{len(lengths)} x {lengths[0]}", args, states, qsl, slots, init, ref, ref_states))
    variants: list[tuple[str, Callable[..., torch.Tensor]]] = []
    if before_src:
        before = load_module(f"{before_src}/kernels/selective_scan.py")
        variants.append(("before (main)", before.selective_scan_varlen))
    for blocking in MAMBA1_BLOCKINGS:
        variants.append((f"tile {blocking.tile}, {blocking.warps} warps, {blocking.channels_per_thread} ch/thread, "
                         f"chains {blocking.chains}", functools.partial(selective_scan_varlen, blocking=blocking)))
    lines = ["| kernel | size | compile+first call (s) | max rel err y / states | CUDA graph median (us) |",
             "|---|---|---:|---:|---:|"]
    for name, fn in variants:
        for size, args, states, qsl, slots, init, ref, ref_states in cases:
            out_states = states.clone()
            torch.cuda.synchronize()
            t0 = time.time()
            out = fn(*args, out_states, qsl, slots, init)
            torch.cuda.synchronize()
            first = time.time() - t0
            err_y = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            err_s = ((out_states - ref_states).abs().max() / ref_states.abs().max()).item()
            ok = err_y < 1e-2 and err_s < 1e-2
            us = graph_median_us(functools.partial(fn, *args, out_states, qsl, slots, init)) if ok else float("nan")
            lines.append(f"| {name} | {size} | {first:.1f} | {err_y:.1e} / {err_s:.1e}{'' if ok else ' FAIL'} "
                         f"| {us:.1f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


# conv prefill layouts: label -> (conv channels, x's (first column, row width) in the in_proj output; None: contiguous)
CONV_LAYOUTS = {
    "H1-7B, contiguous x": (H1_7B["H"] * H1_7B["P"] + 2 * H1_7B["G"] * H1_7B["N"], None),
    "H1-7B, x = in_proj[:, 3072:6656] of 8728": (3584, (3072, 8728)),  # [z | xBC | dt | q | k | v]
    "FalconMamba-7B, x = in_proj[:, :8192] of 16384": (MAMBA_7B["C"], (0, 16384)),  # [x | z]
}


def bench_conv_varlen(lengths: list[int], layout: str) -> Row:
    C, in_proj = CONV_LAYOUTS[layout]
    K = H1_7B["K"]
    T = sum(lengths)
    if in_proj is None:
        x = torch.randn(T, C, device=DEV, dtype=DTYPE)
    else:
        first, width = in_proj
        x = torch.randn(T, width, device=DEV, dtype=DTYPE)[:, first: first + C]
    weight = torch.randn(C, K, device=DEV, dtype=DTYPE)
    bias = torch.randn(C, device=DEV, dtype=DTYPE)
    states = torch.randn(len(lengths), C, K - 1, device=DEV, dtype=DTYPE)
    qsl, slots, init = varlen_batch(lengths)
    nbytes = 2 * T * C * DTYPE.itemsize + 2 * len(lengths) * C * (K - 1) * DTYPE.itemsize
    call = lambda: causal_conv1d_varlen(x, weight, bias, states, qsl, slots, init)  # noqa: E731
    size = f"{len(lengths)} x {lengths[0]} tokens" if len(lengths) > 1 else f"{T} tokens"
    return Row(f"conv1d prefill ({layout})", f"{size} x C={C}", *timed([call], graph_calls=8), nbytes)


def table(rows: list[Row], ceilings: Ceilings) -> str:
    lines = [f"| kernel | size | do_bench median (us) | CUDA graph (us) | MB moved | GB/s "
             f"| % of {ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s copy | GFLOP | TFLOP/s "
             f"| % of {ceilings.bf16_flops / 1e12:.0f} TFLOP/s matmul |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gbs = r.bytes / (r.eager_us * 1e-6) / 1e9
        cells = [r.kernel, r.size, f"{r.eager_us:.1f}", f"{r.graph_us:.1f}", f"{r.bytes / 1e6:.2f}", f"{gbs:.0f}",
                 f"{100 * gbs * 1e9 / ceilings.hbm_bytes_per_s:.0f}%"]
        if r.flops:
            tfs = r.flops / (r.eager_us * 1e-6) / 1e12
            cells += [f"{r.flops / 1e9:.1f}", f"{tfs:.0f}", f"{100 * tfs * 1e12 / ceilings.bf16_flops:.0f}%"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GROUPS: dict[str, Callable[[], list[Row]]] = {
    "conv-update": lambda: [bench_conv_update(b) for b in (1, 32, 256)],
    "mamba2-update": lambda: [bench_ssm_state_update(b) for b in (1, 32, 256)],
    "mamba1-step": lambda: [bench_selective_scan_update(b) for b in (1, 32, 256)],
    "mamba2-prefill": lambda: [bench_ssd(lengths) for lengths in ([4096], [256] * 16)],
    "mamba1-prefill": lambda: [bench_selective_scan(lengths) for lengths in ([4096], [256] * 16)],
    "conv-prefill": lambda: [bench_conv_varlen(lengths, layout) for layout in CONV_LAYOUTS
                             for lengths in ([4096], [256] * 16)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--only", help="comma-separated kernel groups to run: " + ", ".join(GROUPS))
    parser.add_argument("--mamba1-sweep", action="store_true", help="time the Mamba1 prefill blockings only")
    parser.add_argument("--before-src", help="with --mamba1-sweep: a tree whose kernels/selective_scan.py to time too")
    args = parser.parse_args()
    if args.mamba1_sweep:
        torch.manual_seed(0)
        text = (f"Mamba1 prefill blockings, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"triton {triton.__version__}, bf16 activations\n\n" + sweep_selective_scan(args.before_src) + "\n")
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    rows = [row for g in GROUPS if g in groups for row in GROUPS[g]()]
    header = (f"Mamba kernels, {datetime.date.today().isoformat()}, {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}, triton {triton.__version__}, bf16 activations; {ceilings.describe()}\n")
    text = header + "\n" + table(rows, ceilings) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
