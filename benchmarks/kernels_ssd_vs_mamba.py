"""Our chunked SSD scan (kernels/ssd_scan.py) side by side with mamba_ssm's `mamba_chunk_scan_combined`, on the
same inputs at the Falcon-H1 shapes, both timed as CUDA-graph replays (triton.testing.do_bench_cudagraph
median; inputs stay in L2 between replays for the smaller cases, the same for both).

Both compute the same thing with an initial state per sequence and the final state out, bf16 inputs, fp32
state: ours reads the initial states from slots and writes the final ones back; mamba_ssm gets them as a
[batch, H, P, N] tensor and returns new ones (it has no slots, so its time includes no gather or scatter).
Equal-length sequences run in mamba_ssm as a dense batch, which is what its kernels support with initial
states. Errors are ||out - ref|| / ||ref|| against the fp32 einsum SSD (kernels/ssd_minimal.py) on the
same bf16 inputs, and between the two implementations.

mamba_ssm is imported from its Python sources (its Triton kernels only; no CUDA extension is built):

    python -m benchmarks.kernels_ssd_vs_mamba --mamba-src PATH/TO/mamba [--models h1-7b] [--sweep] [--out OUT]

--sweep also times every launch candidate of the chunk scan and of the state walk (kernels/ssd_scan.py:
SCAN_CANDIDATES, WALK_CANDIDATES, clipped to the shape), each kernel alone as a CUDA-graph replay after the whole
call with that candidate was checked against the reference, and then the whole call with the fastest of each;
each candidate is printed as the dict of SsdLaunch fields that ssd_scan.TUNED takes for the shape. --profile
prints each implementation's kernel times (torch.profiler, eager calls) and mamba_ssm's autotuned settings to
stderr. --warm only compiles and autotunes; with --shard I/N it compiles every N-th candidate from the I-th,
so N processes can fill the Triton cache in parallel before a timed run (mamba_ssm's only at shard 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import emit  # noqa: E402
from kernels import ssd_scan  # noqa: E402
from kernels.ssd_minimal import ssd_chunked  # noqa: E402

# (H, P, G, N, chunk) of Falcon-H1's Mamba2 mixers, and the batches timed at each.
MODELS = {"h1-0.5b": (24, 64, 1, 128, 128), "h1-7b": (24, 128, 1, 256, 256), "h1-34b": (32, 128, 2, 256, 128)}
CASES = {"h1-0.5b": ([4096], [256] * 16), "h1-7b": ([4096], [256] * 16, [32768]), "h1-34b": ([4096], [256] * 16)}
NO_LIMIT = (0.0, math.inf)
MAX_ERROR = 1e-2  # a candidate further than this from the reference (or mamba_ssm's output) is wrong


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    dt_bias: torch.Tensor
    states: torch.Tensor  # [seqs, H, P, N] fp32 initial states, one slot per sequence
    qsl: torch.Tensor
    lengths: list[int]
    chunk: int


def make_inputs(model: str, lengths: list[int], dtype: torch.dtype = torch.bfloat16) -> Inputs:
    H, P, G, N, chunk = MODELS[model]
    T = sum(lengths)
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return Inputs(x=torch.randn(T, H, P, device="cuda", dtype=dtype),
                  dt=torch.randn(T, H, device="cuda", dtype=dtype),
                  A=-torch.rand(H, device="cuda") * 4 - 0.1,
                  B=torch.randn(T, G, N, device="cuda", dtype=dtype),
                  C=torch.randn(T, G, N, device="cuda", dtype=dtype),
                  D=torch.randn(H, device="cuda"), dt_bias=torch.randn(H, device="cuda") - 2,
                  states=torch.randn(len(lengths), H, P, N, device="cuda"), qsl=qsl, lengths=lengths, chunk=chunk)


def ours(inp: Inputs, launch: ssd_scan.SsdLaunch | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The engine's call: initial states read from slots 0..seqs-1 of a copy, final states written there."""
    slots = torch.arange(len(inp.lengths), dtype=torch.int32, device="cuda")
    init = torch.ones(len(inp.lengths), dtype=torch.bool, device="cuda")
    states = inp.states.clone()

    def call():
        y = ssd_scan.ssd_scan_varlen(inp.x, inp.dt, inp.A, inp.B, inp.C, inp.D, inp.dt_bias, NO_LIMIT, states,
                                     inp.qsl, slots, init, inp.chunk, launch)
        return y, states
    return call


def our_launches(inp: Inputs, launch: ssd_scan.SsdLaunch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One call's four kernel launches with `launch`, run once: (y, final states, the launches)."""
    slots = torch.arange(len(inp.lengths), dtype=torch.int32, device="cuda")
    init = torch.ones(len(inp.lengths), dtype=torch.bool, device="cuda")
    states = inp.states.clone()
    y, launches = ssd_scan.ssd_scan_launches(inp.x, inp.dt, inp.A, inp.B, inp.C, inp.D, inp.dt_bias, NO_LIMIT,
                                             states, inp.qsl, slots, init, inp.chunk, launch)
    for run in launches.values():
        run()
    torch.cuda.synchronize()
    return y.clone(), states.clone(), launches


def launch_fields(launch: ssd_scan.SsdLaunch, prefix: str = "") -> dict[str, int]:
    """launch's fields that differ from SsdLaunch's defaults (those starting with prefix): a TUNED entry."""
    default = ssd_scan.SsdLaunch()
    return {f.name: getattr(launch, f.name) for f in dataclasses.fields(launch)
            if f.name.startswith(prefix) and getattr(launch, f.name) != getattr(default, f.name)}


def mamba(inp: Inputs) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    batch, length = len(inp.lengths), inp.lengths[0]
    assert all(n == length for n in inp.lengths), "mamba_ssm's dense batch needs equal lengths"

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, *t.shape[1:])

    def call():
        y, final = mamba_chunk_scan_combined(view(inp.x), view(inp.dt), inp.A, view(inp.B), view(inp.C), inp.chunk,
                                             D=inp.D, dt_bias=inp.dt_bias, initial_states=inp.states,
                                             dt_softplus=True, dt_limit=NO_LIMIT, return_final_states=True)
        return y.view(inp.x.shape), final
    return call


def mamba_configs() -> list[str]:
    """The launch settings mamba_ssm's autotuner picked for its last shape."""
    from mamba_ssm.ops.triton import ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_state_passing
    kernels = (ssd_chunk_state._chunk_cumsum_fwd_kernel, ssd_chunk_state._chunk_state_fwd_kernel,
               ssd_state_passing._state_passing_fwd_kernel, ssd_bmm._bmm_chunk_fwd_kernel,
               ssd_chunk_scan._chunk_scan_fwd_kernel)
    return [f"{k.fn.__name__}: {getattr(k, 'best_config', None)}" for k in kernels]


def reference(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 einsum SSD per sequence on the same (upcast) inputs."""
    dt = F.softplus(inp.dt.float() + inp.dt_bias)
    ys, finals = [], []
    for b, (lo, hi) in enumerate(zip(inp.qsl[:-1].tolist(), inp.qsl[1:].tolist())):
        y, final = ssd_chunked(inp.x[lo:hi].float(), dt[lo:hi], inp.A, inp.B[lo:hi].float(), inp.C[lo:hi].float(),
                               inp.D, inp.states[b], inp.chunk)
        ys.append(y)
        finals.append(final)
    return torch.cat(ys), torch.stack(finals)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def graph_us(fn: Callable[[], object], rep: int = 20) -> float:
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def kernel_times(fn: Callable[[], object], calls: int = 5) -> list[tuple[str, float]]:
    """(kernel, device us per call) of fn's launches, from torch.profiler over a few eager calls."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / calls) for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


class Checker:
    """Each output's relative error against the fp32 reference and against the first implementation checked."""

    def __init__(self, ref: tuple[torch.Tensor | None, torch.Tensor | None]):
        self.ref, self.first = ref, None

    def __call__(self, y: torch.Tensor, s: torch.Tensor) -> tuple[str, str, bool]:
        """(vs reference, vs the first implementation, within MAX_ERROR of both)."""
        checks = [(y, s, *self.ref)] + ([(y, s, *self.first)] if self.first else [])
        self.first = self.first or (y.clone(), s.clone())
        errs = [(rel(a, ra), rel(b, rb)) if ra is not None else None for a, b, ra, rb in checks]
        text = [f"{e[0]:.1e} / {e[1]:.1e}" if e else "-" for e in errs] + ["-"] * (2 - len(errs))
        return text[0], text[1], all(max(e) < MAX_ERROR for e in errs if e)


def time_implementations(inp: Inputs, model: str, size: str, impls: dict[str, Callable[[Inputs], Callable]],
                         check: Checker, warm: bool, profile: bool) -> list[list[str]]:
    """One row per implementation: its whole call as a CUDA-graph replay, and its errors."""
    rows = []
    for name, make in impls.items():
        fn = make(inp)
        y, s = fn()  # compiles / autotunes outside the graph
        torch.cuda.synchronize()
        if warm:
            continue
        errors = check(y, s)
        us = graph_us(fn)
        if profile:
            for kernel, k_us in kernel_times(fn):
                print(f"  profile {model} {size} {name}: {k_us:8.1f} us  {kernel[:90]}", file=sys.stderr, flush=True)
            if name == "mamba_ssm":
                for line in mamba_configs():
                    print(f"  autotuned {model} {size}: {line}", file=sys.stderr, flush=True)
        rows.append([model, size, name, f"{us:.1f}", *errors[:2], ""])
    return rows


def sweep_launches(inp: Inputs, model: str, size: str, lengths: list[int], check: Checker, warm: bool,
                   shard: tuple[int, int]) -> list[list[str]]:
    """Every chunk-scan and walk candidate timed alone (this shard's share), then the whole call with the best
    of each."""
    H, P, G, N, chunk = MODELS[model]
    default = ssd_scan.ssd_launch(inp.x.dtype, P, N, chunk, sum(lengths), len(lengths))
    rows, best = [], {}
    for kernel, prefix, candidates in (("scan", "scan_", ssd_scan.SCAN_CANDIDATES),
                                       ("walk", "state_", ssd_scan.WALK_CANDIDATES)):
        for j, launch in enumerate(ssd_scan.launch_candidates(default, [{}] + candidates, P, N, chunk)):
            if j % shard[1] != shard[0]:
                continue
            name = f"{kernel} {launch_fields(launch, prefix)}" + (" (default)" if j == 0 else "")
            try:
                y, s, launches = our_launches(inp, launch)
                if warm:
                    continue
                vs_ref, vs_first, ok = check(y, s)
                us = graph_us(launches[kernel], rep=10) if ok else math.inf
            except Exception as e:  # a candidate that does not compile or fit is reported, not fatal
                rows.append([model, size, name, "failed", type(e).__name__ + ": " + str(e).splitlines()[0][:80],
                             "", ""])
                continue
            rows.append([model, size, name, f"{us:.1f}" if ok else "wrong", vs_ref, vs_first, "kernel alone"])
            if us < best.get(kernel, (math.inf, None))[0]:
                best[kernel] = (us, launch)
    if not warm and len(best) == 2:
        fields = {**launch_fields(best["scan"][1], "scan_"), **launch_fields(best["walk"][1], "state_")}
        fn = ours(inp, dataclasses.replace(ssd_scan.SsdLaunch(), **launch_fields(default, "cb_"), **fields))
        y, s = fn()
        torch.cuda.synchronize()
        rows.append([model, size, f"ours best {fields}", f"{graph_us(fn):.1f}", *check(y, s)[:2], ""])
    return rows


def run_case(model: str, lengths: list[int], impls: dict[str, Callable[[Inputs], Callable]], sweep: bool,
             warm: bool, profile: bool = False, shard: tuple[int, int] = (0, 1)) -> list[list[str]]:
    torch.manual_seed(0)
    inp = make_inputs(model, lengths)
    size = f"{len(lengths)} x {lengths[0]}" if len(lengths) > 1 else f"{lengths[0]}"
    check = Checker(reference(inp) if not warm and sum(lengths) <= 8192 else (None, None))
    rows = time_implementations(inp, model, size, impls if shard[0] == 0 else {}, check, warm, profile)
    if sweep:
        rows += sweep_launches(inp, model, size, lengths, check, warm, shard)
    times = {r[2]: float(r[3]) for r in rows if r[6] == "" and r[3] not in ("failed", "wrong")}
    if "mamba_ssm" in times:
        for r in rows:
            if r[2] in times:
                r[6] = f"{times['mamba_ssm'] / times[r[2]]:.2f}x"
    for r in rows:  # as each case finishes, for runs cut short
        print("| " + " | ".join(r) + " |", file=sys.stderr, flush=True)
    return rows


def main(extra_impls: dict[str, Callable[[Inputs], Callable]] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mamba-src", type=Path, required=True, help="a checkout of state-spaces/mamba")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sweep", action="store_true", help="also time every scan and walk launch candidate")
    parser.add_argument("--shard", default="0/1", help="I/N: with --warm, compile every N-th candidate from the I-th")
    parser.add_argument("--warm", action="store_true", help="compile and autotune only, time nothing")
    parser.add_argument("--profile", action="store_true", help="also print each implementation's kernel times")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    sys.path.insert(0, str(args.mamba_src))
    impls = {"mamba_ssm": mamba, "ours": ours, **(extra_impls or {})}
    shard = tuple(int(v) for v in args.shard.split("/"))
    rows = [row for model in args.models for lengths in CASES[model]
            for row in run_case(model, lengths, impls, args.sweep, args.warm, args.profile, shard)]
    if args.warm:
        return
    header = ["model", "tokens", "implementation", "CUDA graph (us)", "rel. err. vs fp32 einsum (y / final state)",
              f"rel. diff. vs {next(iter(impls))} (y / final state)", "mamba_ssm time / this"]
    emit([f"SSD prefill scan vs mamba_ssm, {datetime.date.today().isoformat()}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}; bf16 inputs, fp32 states.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(r) + " |" for r in rows)], args.out)


if __name__ == "__main__":
    main()
