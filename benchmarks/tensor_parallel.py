"""Tensor parallelism on the GPUs of one host: decode tok/s at 1 and 32 sequences and 4k prefill time of
each model at each tensor-parallel size, random weights with the published shapes (benchmarks/offline.py's
measurements), with TP=N's speedup over TP=1 where both ran (issue #14's target: TP=2 decode at 1
sequence >= 1.7x TP=1 on Falcon-H1-34B).

    python -m benchmarks.tensor_parallel --runs falcon-h1-34b:1 falcon-h1-34b:2 falcon-h1-7b:2 --out tp.md

On the CPU (gloo, fp32) it only smoke-tests the command on a tiny shape: --device cpu --runs tiny:1 tiny:2.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.offline import SHAPES, bench_decode, bench_prefill, model_dir
from benchmarks.report import emit
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine

TINY = dict(SHAPES["falcon-h1-0.5b"], vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=8,
            mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16, max_position_embeddings=8192,
            torch_dtype="float32")


def bench(name: str, tp: int, root: Path, device: str, batch_sizes: list[int], prefill_lens: list[int],
          steps: int) -> dict[str, float]:
    """{measurement: seconds per step or per prefill} of one model at one tensor-parallel size."""
    args = EngineArgs(model=str(model_dir(name, root, TINY if name == "tiny" else None)), device=device,
                      dtype="bfloat16" if device == "cuda" else "float32", load_format="dummy",
                      max_model_len=max(prefill_lens) + 64, max_num_seqs=max(batch_sizes),
                      max_num_batched_tokens=max(8192 if device == "cuda" else 2048, max(batch_sizes)),
                      gpu_memory_utilization=0.92, tensor_parallel_size=tp)
    start = time.perf_counter()
    engine = LLMEngine(args)
    results = {"start-up (load + plan + graph capture), s": time.perf_counter() - start}
    try:
        bench_decode(engine, min(batch_sizes), steps=4)  # compile kernels before timing
        bench_prefill(engine, min(prefill_lens))
        for n in batch_sizes:
            results[f"decode, {n} seq, tok/s"] = bench_decode(engine, n, steps=steps)[0]
        for tokens in prefill_lens:
            results[f"prefill {tokens:,} tokens, ms"] = bench_prefill(engine, tokens) * 1e3
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def speedup(measurement: str, value: float, single: float | None) -> str:
    if single is None or measurement.startswith("start-up"):
        return ""
    ratio = value / single if "tok/s" in measurement else single / value  # higher is better either way
    return f"{ratio:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["falcon-h1-34b:1", "falcon-h1-34b:2", "falcon-h1-7b:1",
                                                      "falcon-h1-7b:2"],
                        help="MODEL:TP pairs, run in this order (one engine at a time)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[4096])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per batch size")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [(name, int(tp)) for name, tp in (run.split(":") for run in args.runs)]
    unknown = {name for name, _ in runs} - {*SHAPES, "tiny"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join([*SHAPES, 'tiny'])}")
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if args.device == "cuda" else "CPU"
    lines = [f"device: {device}, torch {torch.__version__}",
             "", "| model | TP | measurement | result | vs TP=1 |", "|---|---|---|---|---|"]
    measured: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for name, tp in runs:
            try:
                measured[name, tp] = results = bench(name, tp, Path(root), args.device, args.batch_sizes,
                                                     args.prefill_lens, args.steps)
            except (torch.cuda.OutOfMemoryError, ValueError) as e:
                lines.append(f"| {name} | {tp} | skipped | {type(e).__name__}: {str(e)[:200]} | |")
                print(lines[-1], flush=True)
                continue
            single = measured.get((name, 1)) if tp > 1 else None
            for measurement, value in results.items():
                lines.append(f"| {name} | {tp} | {measurement} | {value:,.1f} | "
                             f"{speedup(measurement, value, single and single.get(measurement))} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
