"""The lm_head matmul with the checkpoint's vocabulary rows against the same rows padded to a multiple of
128 (engine/distributed/layers.py LMHead), at decode batch sizes: time, weight-streaming rate against the
measured copy bandwidth, and which cuBLAS kernel ran (torch.profiler).

    python -m benchmarks.lm_head [--out lm_head.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.ceilings import copy_bytes_per_s, median_seconds
from benchmarks.report import emit
from engine.models.common import padded_vocab_size

HEADS = {"falcon-h1-7b": (3072, 130049), "falcon-h1-0.5b": (1024, 32784), "falcon-h1-34b": (5120, 261120)}


def kernel_name(fn) -> str:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return max(names, key=len, default="?")[:70]


def bench_head(model: str, d: int, vocab: int, rows: int, n: int, hbm: float) -> str:
    """One table row: the head as the engine runs it (matmul, slice, fp32) over a [rows, d] weight."""
    weight = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    seconds = median_seconds(lambda: F.linear(hidden, weight)[:, :vocab].float())
    rate = weight.nbytes / seconds
    return (f"| {model} | {rows:,} | {n} | {seconds * 1e6:.0f} | {rate / 1e9:,.0f} | {rate / hbm:.0%} "
            f"| {kernel_name(lambda: F.linear(hidden, weight))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hbm = copy_bytes_per_s()
    lines = [f"device: {torch.cuda.get_device_name()}; copy bandwidth {hbm / 1e12:.2f} TB/s", "",
             "| model | rows | batch | time (us) | weight GB/s | of copy bandwidth | matmul kernel |",
             "|---|---|---|---|---|---|---|"]
    for model, (d, vocab) in HEADS.items():
        for rows in sorted({vocab, padded_vocab_size(vocab)}):
            for n in args.batch_sizes:
                lines.append(bench_head(model, d, vocab, rows, n, hbm))
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
