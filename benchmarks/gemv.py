"""One-row 16-bit projections: cuBLAS (F.linear) against kernels/gemv.py at every decode projection shape.

    python -m benchmarks.gemv [--out FILE]

Each timing is a CUDA graph of calls cycling through enough weight copies to miss the L2 (as in
benchmarks/quant.py), replayed; "of ceiling" is weight bytes per call over the time against the
device-to-device copy measured in the same run. Every GEMV config is checked against the reference first.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.ceilings import copy_bytes_per_s
from benchmarks.quant import _copies, gemm_time
from kernels.gemv import gemv, gemv_config, gemv_ref

# (K, N) of each model's one-row projections, bf16 (the vocabularies padded to 128 rows as LMHead stores them).
SHAPES = {
    "falcon-h1-0.5b": {"in_proj+qkv": (1024, 4120), "out_proj": (1536, 1024), "o_proj": (512, 1024),
                       "gate+up": (1024, 4096), "down": (2048, 1024), "lm_head": (1024, 32896)},
    "falcon-h1-7b": {"in_proj+qkv": (3072, 8728), "out_proj": (3072, 3072), "o_proj": (1536, 3072),
                     "gate+up": (3072, 24576), "down": (12288, 3072), "lm_head": (3072, 130176)},
    "falcon-mamba-7b": {"in_proj": (4096, 16384), "x_proj": (8192, 288), "dt_proj": (256, 8192),
                        "out_proj": (8192, 4096), "lm_head": (4096, 65024)},
}
CANDIDATES = [dict(block_n=bn, num_warps=w, waves=v) for bn, w, v in itertools.product((2, 4, 8), (2, 4, 8), (2, 8))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    ceiling = copy_bytes_per_s()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    every = []
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy ceiling {ceiling / 1e12:.2f} TB/s", "",
             "| model | GEMM (K x N) | MB | cuBLAS us (of ceiling) | GEMV default us | best GEMV us (of ceiling) "
             "| best config | wrong |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for model, shapes in SHAPES.items():
        for name, (K, N) in shapes.items():
            w = (torch.randn(N, K, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
            x = torch.randn(1, K, device=dev, generator=gen).to(torch.bfloat16)
            copies = _copies((w,), w.nbytes)
            ref = gemv_ref(x, w, None)
            cublas = gemm_time(lambda x, w: F.linear(x, w[0]), copies, x)
            times, wrong = {}, 0
            for cand in CANDIDATES:
                cfg = gemv_config(N, K, dev, **cand)
                key = (cfg["BLOCK_N"], cfg["num_warps"], cfg["SPLIT_K"])
                if key in times:
                    continue
                if not torch.allclose(gemv(x, w, None, config=cfg).float(), ref.float(), rtol=2e-2, atol=2e-2):
                    wrong += 1
                    continue
                times[key] = gemm_time(lambda x, w, cfg=cfg: gemv(x, w[0], None, config=cfg), copies, x)
            default = gemm_time(lambda x, w: gemv(x, w[0]), copies, x)
            (bn, warps, split), best = min(times.items(), key=lambda kv: kv[1])
            every.append(f"| {model} | {name} | " + "; ".join(f"{bn}/{wp}/{sp}: {t * 1e6:.1f}"
                                                            for (bn, wp, sp), t in sorted(times.items())) + " |")
            lines.append(f"| {model} | {name} ({K} x {N}) | {w.nbytes / 1e6:.1f} | {cublas * 1e6:.1f} "
                         f"({w.nbytes / cublas / ceiling:.0%}) | {default * 1e6:.1f} | {best * 1e6:.1f} "
                         f"({w.nbytes / best / ceiling:.0%}) | BLOCK_N {bn}, {warps} warps, split {split} | {wrong} |")
            print(lines[-1], flush=True)
    lines += ["", "Every config, us (BLOCK_N / warps / split: time):", "", "| model | GEMM | configs |",
              "|---|---|---|"]
    lines += every
    print("\n".join(lines[-len(every) - 5:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
