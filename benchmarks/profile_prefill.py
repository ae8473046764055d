"""Where a prefill step's time goes: the host's time to enqueue the forward pass (Python, Triton and torch
launches; with prefill CUDA graphs, filling the static inputs and one graph launch), the device's elapsed time
over the same call, the kernels' busy time inside it (the profiler's sum, and the kernels by time), and the rest
of the step (inputs, sampling, caches). When the device's elapsed time follows the host's enqueue time and
exceeds the kernels' busy time, the forward is bound by the host.

    python -m benchmarks.profile_prefill --model falcon-h1-7b --prefill-lens 128 512 4096 [--enforce-eager]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.offline import model_dir
from benchmarks.report import emit
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


def prefill_once(engine: LLMEngine, ids: list[int], tag: str) -> None:
    engine.add_request(tag, ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="falcon-h1-7b")
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[128, 512, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (prefill or decode)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=str(model_dir(args.model, Path(root))), device="cuda", dtype="bfloat16",
                                      load_format="dummy", max_model_len=max(args.prefill_lens) + 64, max_num_seqs=8,
                                      max_num_batched_tokens=max(8192, max(args.prefill_lens)),
                                      enable_prefix_caching=False, enforce_eager=args.enforce_eager))
    runner, timings = engine.runner, []

    def timed(forward):  # host enqueue time (no sync) and device time of the same call
        def call(*a, **k):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            start = time.perf_counter()
            out = forward(*a, **k)
            host = time.perf_counter() - start
            end.record()
            timings.append((host, begin, end))
            return out
        return call

    runner.forward, runner.replay_prefill = timed(runner.forward), timed(runner.replay_prefill)
    mode = "eager" if args.enforce_eager else f"prefill CUDA graphs kept at {runner.prefill_graphs.buckets} tokens"
    lines = [f"{args.model}, {torch.cuda.get_device_name()}, prefill of one prompt ({mode}; prefix cache off), "
             f"median of {args.repeats}", "",
             "| tokens | engine step(s) | forward: host enqueue | forward: device elapsed | kernels busy "
             "| rest of the step (host) | kernel launches | host per launch |", "|---|---|---|---|---|---|---|---|"]
    for n in args.prefill_lens:
        ids = torch.randint(5, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        prefill_once(engine, ids, f"warm{n}")  # Triton specializations for this length compile here
        steps, hosts, devices = [], [], []
        for r in range(args.repeats):
            timings.clear()
            torch.cuda.synchronize()
            start = time.perf_counter()
            prefill_once(engine, ids, f"p{n}-{r}")
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
            hosts.append(sum(h for h, _, _ in timings))
            devices.append(sum(b.elapsed_time(e) / 1e3 for _, b, e in timings))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill_once(engine, ids, f"prof{n}")
            torch.cuda.synchronize()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in _LAUNCHES)
        # the kernels' own events only: an op (aten::mm) or a launch call (cuLaunchKernelEx) also carries the
        # time of the kernels it started, which counted it twice
        busy = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3  # ms
        step, host, device = (sorted(x)[len(x) // 2] * 1e3 for x in (steps, hosts, devices))
        lines.append(f"| {n:,} | {step:.2f} ms | {host:.2f} ms | {device:.2f} ms | {busy:.2f} ms "
                     f"| {step - max(host, device):.2f} ms | {launches:,} | {host * 1e3 / max(launches, 1):.1f} us |")
        print(lines[-1], flush=True)
        lines += ["", f"Host side of a {n:,}-token prefill step, by self CPU time:", "```",
                  events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60), "```", "",
                  "Device side of the same step, by kernel time:", "```",
                  events.table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=60), "```", ""]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
