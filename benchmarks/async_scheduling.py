"""Decode step time with async scheduling on and off (EngineArgs.async_scheduling), in one engine and
one process, against the decode graph's replay alone (the GPU's share), with host timers per phase of
LLMEngine.step (nested phases are counted inside their callers too; "wait" is the host blocked on the
sampled tokens).

    python -m benchmarks.async_scheduling --model falcon-h1-7b --batch-sizes 1 32 --out async.md
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.ceilings import replay_seconds
from benchmarks.offline import model_dir
from engine import sampler
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

# (attribute of the engine holding the object, or "" for the engine; method, label): wrapped on the instance.
PHASES = [("scheduler", "schedule", "schedule"), ("async_scheduler", "schedule_ahead", "schedule ahead"),
          ("runner", "apply_copies", "apply copies"), ("runner", "execute", "stage + launch forward"),
          ("", "_report_deferred", "report deferred"), ("", "_complete", "complete previous (incl. wait, emit)"),
          ("", "_advance", "advance"), ("", "_sample", "sample + wait (stepwise)"),
          ("async_scheduler", "sample_ahead", "sample, launch only (async)"), ("", "_emit", "emit (stops, outputs)"),
          ("", "_mark_finished_requests", "mark finished")]


class PhaseTimers:
    def __init__(self, engine: LLMEngine):
        self.seconds: dict[str, float] = defaultdict(float)
        for owner, name, label in PHASES:
            target = getattr(engine, owner) if owner else engine
            setattr(target, name, self._timed(getattr(target, name), label))
        self._result = sampler.DeviceSample.result
        timed_result = self._timed(self._result, "wait for sampled tokens")
        sampler.DeviceSample.result = lambda sample: timed_result(sample)

    def _timed(self, fn, label: str):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
        return run

    def reset(self) -> None:
        self.seconds.clear()

    def close(self) -> None:
        sampler.DeviceSample.result = self._result


def time_steps(engine: LLMEngine, timers: PhaseTimers, batch: int, steps: int, overlap: bool
               ) -> tuple[float, dict[str, float]]:
    """Mean ms per engine step over `steps` decode steps of `batch` sequences, and the phases' us per step."""
    engine.args.async_scheduling = overlap
    params = SamplingParams(max_tokens=steps + 20, temperature=0, ignore_eos=True)
    ids = [f"{overlap}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, list(range(5, 133)), params)
    for _ in range(5):  # the prefill, then decodes (the overlap starts on the second)
        engine.step()
    torch.cuda.synchronize()
    timers.reset()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    phases = {label: s / steps * 1e6 for label, s in timers.seconds.items()}
    for request_id in ids:
        engine.abort(request_id)
    assert not engine.has_unfinished()
    return ms, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="falcon-h1-7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs per batch size (alternating)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=str(model_dir(args.model, Path(root))), device="cuda", dtype="bfloat16",
                                      load_format="dummy", max_model_len=4096, max_num_seqs=max(args.batch_sizes)))
    timers = PhaseTimers(engine)
    lines = [f"# Async scheduling, {args.model} (bf16, dummy weights), {args.steps} decode steps per run", "",
             "| batch | mode | engine step ms (each run) | graph replay ms | step - replay ms |",
             "|---|---|---|---|---|"]
    phase_rows: dict[tuple[int, str], dict[str, float]] = {}
    for batch in args.batch_sizes:
        runs: dict[str, list[float]] = {"stepwise": [], "async": []}
        for _ in range(args.repeats):
            for mode, overlap in (("stepwise", False), ("async", True)):
                ms, phases = time_steps(engine, timers, batch, args.steps, overlap)
                runs[mode].append(ms)
                phase_rows[(batch, mode)] = phases
        # Replayed after the runs: the buckets share one input buffer, laid out per bucket, so a bucket's
        # inputs are valid only right after a step of its own (before, stale ids indexed out of bounds).
        graphs = engine.runner.graphs
        replay_ms = replay_seconds(graphs.graphs[next(b for b in graphs.buckets if b >= batch)], 50) * 1e3
        for mode, times in runs.items():
            best = min(times)
            lines.append(f"| {batch} | {mode} | {' / '.join(f'{t:.3f}' for t in times)} | {replay_ms:.3f} | "
                         f"{best - replay_ms:.3f} |")
            print(f"{args.model} batch {batch} {mode}: engine step {best:.3f} ms (runs "
                  f"{', '.join(f'{t:.3f}' for t in times)}), graph replay {replay_ms:.3f} ms", flush=True)
    timers.close()
    labels = [label for *_, label in PHASES] + ["wait for sampled tokens"]
    keys = sorted(phase_rows)
    lines += ["", "Host time per step by phase, us (last run of each; nested phases count in their callers too)", "",
              "| phase | " + " | ".join(f"b{b} {m}" for b, m in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{phase_rows[k].get(label, 0.0):.0f}" for k in keys) + " |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
