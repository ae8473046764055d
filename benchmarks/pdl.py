"""One-sequence decode step with programmatic dependent launch on and off (kernels/pdl.py), same process.

One engine per model (dummy weights at the real shapes, every layer): a 128-token prompt and a few decode
steps, then the decode graph of batch 1 captured a second time with PDL off over the same static inputs.
The two graphs are timed by replay, alternately (on, off, on, off: drift shows as a difference between
the rounds), and by whole engine steps (host work included). Then each graph replays once from the same
conv / SSM states (restored before each; the KV write of the step's one token is the same either way) and
their logits are compared: PDL changes no arithmetic, so they should be equal.

    python -m benchmarks.pdl --models falcon-h1-7b falcon-mamba-7b --out $OUT/pdl

--lock FILE: the timed part runs holding an exclusive lock on FILE, so that processes started together
(their engine builds and Triton compiles overlapping) time one at a time. Each engine takes a fixed small KV
pool and 40% of the GPU at most, so two fit side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ceilings import replay_seconds
from benchmarks.offline import model_dir
from engine.config import EngineArgs
from engine.cuda_graphs import capture_graph
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kernels import pdl


def engine_step_ms(engine: LLMEngine, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def state_tensors(engine: LLMEngine) -> list[torch.Tensor]:
    """The recurrent states a decode step updates in place (conv and SSM, every layer)."""
    return [t for cache in engine.runner.caches for t in (cache.conv_state, cache.ssm_state)]


@torch.inference_mode()  # the caches are inference tensors: written in place only inside it
def replay_logits(graph: torch.cuda.CUDAGraph, logits: torch.Tensor, states: list[torch.Tensor],
                  saved: list[torch.Tensor]) -> torch.Tensor:
    """The graph's logits after one replay from the saved states (restored first)."""
    for t, s in zip(states, saved):
        t.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    return logits.float().clone()


def time_both(engine: LLMEngine, on: tuple, off: tuple, reps: int, steps: int) -> tuple[dict, dict]:
    """Replay ms of each (graph, logits) pair, two rounds alternating; then ms of whole engine steps with each
    as the engine's batch-1 graph."""
    graphs = engine.runner.graphs
    rounds = {"on": [], "off": []}
    for _ in range(2):
        rounds["on"].append(replay_seconds(on[0], reps) * 1e3)
        rounds["off"].append(replay_seconds(off[0], reps) * 1e3)
    step = {}
    for name, (graph, logits) in {"on": on, "off": off}.items():
        graphs.graphs[1], graphs.logits[1] = graph, logits
        step[name] = engine_step_ms(engine, steps)
    graphs.graphs[1], graphs.logits[1] = on
    return rounds, step


def capture_without_pdl(engine: LLMEngine) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """The batch-1 decode graph captured again, PDL off, over the same static inputs (a pool of its own)."""
    runner = engine.runner
    batch = runner.graphs.batch(1)
    pdl.ENABLED = False
    try:
        with torch.inference_mode():
            return capture_graph(lambda: runner.model.compute_logits(runner.model(batch, runner.caches)),
                                 torch.cuda.graph_pool_handle(), runner.model.tp.size)
    finally:
        pdl.ENABLED = True


def measure(model: str, reps: int, steps: int, lock: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=str(model_dir(model, Path(root))), device="cuda", dtype="bfloat16",
                                      load_format="dummy", max_model_len=2048, max_num_seqs=1,
                                      max_num_batched_tokens=256, num_kv_blocks=256, gpu_memory_utilization=0.4,
                                      enable_prefix_caching=False))
    graphs = engine.runner.graphs
    engine.add_request("0", list(range(5, 133)), SamplingParams(max_tokens=2048 - 128, temperature=0,
                                                                ignore_eos=True))
    for _ in range(4):  # prefill, then decodes through the bucket-1 graph: its inputs now hold a real row
        engine.step()
    on_graph, on_logits = graphs.graphs[1], graphs.logits[1]
    off_graph, off_logits = capture_without_pdl(engine)
    with contextlib.ExitStack() as held:
        if lock is not None:
            fcntl.flock(held.enter_context(open(lock, "w")), fcntl.LOCK_EX)  # released when the file closes
        rounds, step = time_both(engine, (on_graph, on_logits), (off_graph, off_logits), reps, steps)
    states = state_tensors(engine)
    with torch.inference_mode():
        saved = [t.clone() for t in states]
    a = replay_logits(on_graph, on_logits, states, saved)
    b = replay_logits(off_graph, off_logits, states, saved)
    result = dict(model=model, pdl_enabled=pdl.enabled(torch.device("cuda")),
                  replay_ms={k: min(v) for k, v in rounds.items()}, replay_rounds_ms=rounds, engine_step_ms=step,
                  logits_max_abs_diff=(a - b).abs().max().item(),
                  same_argmax=bool((a.argmax(-1) == b.argmax(-1)).all()))
    result["replay_tok_s"] = {k: 1e3 / v for k, v in result["replay_ms"].items()}
    result["engine_tok_s"] = {k: 1e3 / v for k, v in step.items()}
    del engine, graphs, on_graph, off_graph, on_logits, off_logits, states, saved
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["falcon-h1-7b", "falcon-mamba-7b"])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lock", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for model in args.models:
        r = measure(model, args.reps, args.steps, args.lock)
        results.append(r)
        print(f"{model} batch 1, PDL enabled {r['pdl_enabled']}: graph replay on {r['replay_ms']['on']:.3f} ms "
              f"({r['replay_tok_s']['on']:.1f} tok/s), off {r['replay_ms']['off']:.3f} ms "
              f"({r['replay_tok_s']['off']:.1f} tok/s), rounds {r['replay_rounds_ms']}; engine step on "
              f"{r['engine_step_ms']['on']:.3f} ms ({r['engine_tok_s']['on']:.1f} tok/s), off "
              f"{r['engine_step_ms']['off']:.3f} ms ({r['engine_tok_s']['off']:.1f} tok/s); logits on vs off: "
              f"max |diff| {r['logits_max_abs_diff']:.3g}, same argmax {r['same_argmax']}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"pdl_{'_'.join(args.models)}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
