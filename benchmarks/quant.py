"""Quantized weights on the GPU: each projection GEMM at decode shapes against the measured copy ceiling,
then end to end (benchmarks/offline.py's machinery, random weights with the published shapes) for bf16,
GPTQ-Int4, GPTQ-Int8 (group 128, act-order) and FP8.

    python -m benchmarks.quant --out OUT_DIR [--models falcon-h1-7b falcon-mamba-7b] [--budget-s 420]
        [--seqs 1 32 256] [--skip gemms sweep e2e]

GEMMs: weights bf16 (torch.nn.functional.linear, cuBLAS), GPTQ 4/8-bit (kernels/quant_linear.py), FP8
weight-only (Triton) and FP8 as the engine runs it (kernels/fp8_linear.py: weight-only below 128 rows,
torch._scaled_mm with activations quantized per row from there). Each timing is a CUDA
graph of calls that cycle through enough weight copies to miss the 50-60 MB L2, replayed; "achieved" is
weight bytes (codes, scales and zero points included) per call over the time, against a device-to-device
copy (bytes read + written, benchmarks/ceilings.py). The sweep tries GPTQ (GEMV and tl.dot kernels) and FP8
weight-only tile configs at 1 / 16 / 32 rows, each checked against the reference, against the default
heuristic. End to end: decode tok/s at --seqs
sequences, a 4k prefill, the weight bytes and how many 4k-context sequences fit. Stops starting new
measurements after --budget-s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.ceilings import copy_bytes_per_s
from benchmarks.offline import SHAPES, bench_decode, bench_prefill, decode_bytes, max_concurrent
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loader import model_weight_bytes
from engine.quantization.gptq import COLUMN_PADDING
from engine.tokenizer import byte_level_tokenizer_files
from kernels import fp8_linear as fp8
from kernels import quant_linear as ql
from kernels.split_k import split_for

# (K, N) of the projections one decode step runs, per layer.
GEMM_SHAPES = {
    "falcon-h1-7b": {"in_proj+qkv": (3072, 8728), "o_proj / out_proj": (3072, 3072), "gate+up": (3072, 24576),
                     "down": (12288, 3072)},
    "falcon-mamba-7b": {"in_proj": (4096, 16384), "out_proj": (8192, 4096)},
}
GPTQ_CONFIG = dict(quant_method="gptq", group_size=128, desc_act=True, sym=True, checkpoint_format="gptq",
                   lm_head=False)
VARIANTS = {"bf16": None, "gptq-int4": 4, "gptq-int8": 8, "fp8": "fp8"}
L2_MISS_BYTES = 256 << 20  # several times the 50-60 MB L2


def time_graph(fn, reps: int = 5) -> float:
    """Seconds per call of fn() (a sequence of launches), captured once as a CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def make_weights(fmt: str, K: int, N: int, gen: torch.Generator):
    """(callable(x, w), weight tuple, bytes of one weight)."""
    w16 = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    if fmt == "bf16":
        return (lambda x, w: F.linear(x, w[0])), (w16,), w16.nbytes
    if fmt.startswith("fp8"):
        q, scale = fp8.quantize_fp8_weight(w16)
        if fmt == "fp8 weight-only":
            return ((lambda x, w, config=None: fp8.fp8_weight_only_linear(x, w[0], w[1], None, config=config)),
                    (q, scale), q.nbytes + scale.nbytes)
        return (lambda x, w: fp8.fp8_linear(x, w[0], w[1], None)), (q, scale), q.nbytes + scale.nbytes
    bits = 4 if fmt == "gptq-int4" else 8
    info = torch.iinfo(torch.int32)
    n_w = -(-N // COLUMN_PADDING) * COLUMN_PADDING  # stored as GPTQLinear stores them
    qweight = torch.randint(info.min, info.max, (K * bits // 32, n_w), device="cuda", dtype=torch.int32,
                            generator=gen)
    scales = torch.full((K // 128, n_w), 0.002, device="cuda", dtype=torch.float16)
    zeros = torch.full((K // 128, n_w), 1 << (bits - 1), device="cuda", dtype=torch.int16)
    perm = torch.randperm(K, device="cuda", generator=gen).to(torch.int32)

    def fn(x, w, config=None):
        return ql.gptq_linear(x, w[0], w[1], w[2], w[3], None, bits, 128, N, config=config)

    return fn, (qweight, scales, zeros, perm), qweight.nbytes + scales.nbytes + zeros.nbytes + perm.nbytes


def gemm_time(fn, weights: list, x: torch.Tensor, **kwargs) -> float:
    return time_graph(lambda: [fn(x, w, **kwargs) for w in weights]) / len(weights)


def bench_gemms(models: list[str], ceiling: float, deadline: float) -> list[str]:
    lines = ["| model | GEMM (K x N) | rows | format | us | GB/s | of copy ceiling |", "|---|---|---|---|---|---|---|"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in models:
        for name, (K, N) in GEMM_SHAPES[model].items():
            for fmt in ("bf16", "gptq-int4", "gptq-int8", "fp8 weight-only", "fp8 engine"):
                fn, w, nbytes = make_weights(fmt, K, N, gen)
                copies = _copies(w, nbytes)
                for rows in (1, 32, 256):
                    if time.perf_counter() > deadline:
                        return lines + ["", "(time budget reached: remaining GEMMs not measured)"]
                    x = torch.randn(rows, K, device="cuda", generator=gen).to(torch.bfloat16)
                    try:
                        seconds = gemm_time(fn, copies, x)
                    except Exception as e:  # record it and go on: one run of this script is all we get
                        lines.append(f"| {model} | {name} ({K} x {N}) | {rows} | {fmt} | failed: {str(e)[:120]} |")
                        continue
                    lines.append(f"| {model} | {name} ({K} x {N}) | {rows} | {fmt} | {seconds * 1e6:.1f} | "
                                 f"{nbytes / seconds / 1e9:,.0f} | {nbytes / seconds / ceiling:.0%} |")
                    print(lines[-1], flush=True)
                del copies
    return lines


def _copies(w: tuple, nbytes: int) -> list[tuple]:
    return [w] + [tuple(t.clone() for t in w) for _ in range(max(1, L2_MISS_BYTES // nbytes) - 1)]


def gptq_candidates(M: int, N: int, K: int, bits: int) -> list[dict]:
    """The tile configs the sweep tries: the GEMV kernel (one row) and the tl.dot one, split for 2-8 waves."""
    pack, dev = 32 // bits, torch.device("cuda")
    out = []
    if M == 1:
        for bn, warps in ((64, 2), (128, 4), (256, 4), (256, 8)):
            out += [dict(kind="gemv", BLOCK_N=bn, BLOCK_K=128, num_warps=warps, num_stages=1,
                         SPLIT_K=split_for(-(-N // bn), K, 128, waves, dev)) for waves in (2, 4, 8)]
    bm = 16 if M <= 16 else 32
    for bn, bk in ((64, 16 * pack), (64, 32 * pack), (128, 16 * pack)):
        tiles = -(-N // bn) * -(-M // bm)
        out += [dict(kind="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=2,
                     SPLIT_K=split_for(tiles, K, bk, waves, dev)) for waves in (2, 4, 8)]
    return out


def fp8_candidates(M: int, N: int, K: int) -> list[dict]:
    dev = torch.device("cuda")
    bm = 16 if M <= 16 else 32
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4,
                 SPLIT_K=split_for(-(-N // bn) * -(-M // bm), K, bk, waves, dev))
            for bn in (32, 64, 128) for bk in (128, 256) for waves in (2, 4, 8)]


def sweep(models: list[str], deadline: float, ceiling: float) -> list[str]:
    """Default heuristic vs every candidate config (each checked against the reference), GPTQ 4 / 8 bits and
    FP8 weight-only at 1 / 16 / 32 rows; the best per kernel kind."""
    lines = ["| GEMM (K x N) | format | rows | default us | best us (of copy ceiling) | best config | best gemv us | "
             "best gemm us | wrong |", "|---|---|---|---|---|---|---|---|---|"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for model in models:
        for K, N in GEMM_SHAPES[model].values():
            for fmt in ("gptq-int4", "gptq-int8", "fp8 weight-only"):
                fn, w, nbytes = make_weights(fmt, K, N, gen)
                copies = _copies(w, nbytes)
                for rows in (1, 16, 32):
                    if time.perf_counter() > deadline:
                        return lines + ["", "(time budget reached)"]
                    x = torch.randn(rows, K, device="cuda", generator=gen).to(torch.bfloat16)
                    if fmt == "fp8 weight-only":
                        ref = fp8.fp8_linear_ref(x, *w, None)
                        cands = fp8_candidates(rows, N, K)
                    else:
                        bits = 4 if fmt == "gptq-int4" else 8
                        ref = ql.gptq_linear_ref(x, *w[:4], None, bits, 128, N)
                        cands = gptq_candidates(rows, N, K, bits)
                    default_t = gemm_time(fn, copies, x)
                    best, by_kind, wrong = (default_t, "default"), {}, 0
                    for cfg in cands:
                        try:
                            err = ((fn(x, w, config=cfg).float() - ref.float()).abs().max() / ref.float().abs().max())
                            if not err < 1e-2:
                                wrong += 1
                                print(f"WRONG {fmt} {K}x{N} rows {rows} {cfg}: {err:.3g}", flush=True)
                                continue
                            t = gemm_time(fn, copies, x, config=cfg)
                        except Exception as e:  # e.g. a tile that needs more shared memory than there is
                            print(f"config {cfg} failed: {str(e)[:100]}", flush=True)
                            continue
                        kind = cfg.get("kind", "gemm")
                        by_kind[kind] = min(by_kind.get(kind, 1.0), t)
                        best = min(best, (t, cfg), key=lambda b: b[0])
                    lines.append(f"| {K} x {N} | {fmt} | {rows} | {default_t * 1e6:.1f} | {best[0] * 1e6:.1f} "
                                 f"({nbytes / best[0] / ceiling:.0%}) | {best[1]} | "
                                 f"{by_kind.get('gemv', 0) * 1e6:.1f} | {by_kind.get('gemm', 0) * 1e6:.1f} | {wrong} |")
                    print(lines[-1], flush=True)
                del copies
    return lines


def model_dir(name: str, variant: str, root: Path) -> Path:
    directory = root / f"{name}-{variant}"
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(SHAPES[name])
    bits = VARIANTS[variant]
    if isinstance(bits, int):
        config["quantization_config"] = dict(GPTQ_CONFIG, bits=bits)
    (directory / "config.json").write_text(json.dumps(config))
    byte_level_tokenizer_files(directory)
    return directory


def bench_end_to_end(models: list[str], ceiling: float, deadline: float, root: Path, seqs: list[int]) -> list[str]:
    decode = " | ".join(f"decode {n} seq" for n in seqs)
    lines = [f"| model | weights | projections' bytes vs bf16 | {decode} | prefill 4,096 | 4k seqs that fit | "
             "start-up |",
             "|---|---|---|" + "---|" * len(seqs) + "---|---|---|"]
    for name in models:
        bf16_projection_bytes = None
        for variant in VARIANTS:
            if time.perf_counter() > deadline:
                return lines + ["", "(time budget reached: remaining models not measured)"]
            start = time.perf_counter()
            args = EngineArgs(model=str(model_dir(name, variant, root)), device="cuda", dtype="bfloat16",
                              load_format="dummy", max_model_len=4096 + 64, max_num_seqs=256,
                              max_num_batched_tokens=8192, gpu_memory_utilization=0.92,
                              quantization="fp8" if variant == "fp8" else None)
            engine = None
            try:
                engine = LLMEngine(args)
                startup = time.perf_counter() - start
                model = engine.runner.model
                total = model_weight_bytes(model)
                unquantized = sum(t.nbytes for n, t in [*model.named_parameters(), *model.named_buffers()]
                                  if "embed" in n or "lm_head" in n)
                projections = total - unquantized  # includes norms, conv and SSM parameters (small)
                bf16_projection_bytes = bf16_projection_bytes or projections
                bench_decode(engine, 1, steps=4)  # compile before timing
                bench_prefill(engine, 1024)
                cells = []
                for n in seqs:
                    tok_s, _ = bench_decode(engine, n, steps=32)
                    roof = n / (decode_bytes(engine, n, 128 + 16) / ceiling)
                    cells.append(f"{tok_s:,.0f} tok/s ({tok_s / roof:.0%} of {roof:,.0f})")
                prefill_ms = bench_prefill(engine, 4096) * 1e3
            except Exception as e:  # record it and go on with the next variant
                lines.append(f"| {name} | {variant} | failed: {type(e).__name__}: {str(e)[:160]} |")
                print(lines[-1], flush=True)
                del engine
                torch.cuda.empty_cache()
                continue
            lines.append(f"| {name} | {variant}: {total / 1e9:.2f} GB | {projections / bf16_projection_bytes:.0%} | "
                         + " | ".join(cells) + f" | {prefill_ms:,.0f} ms | {max_concurrent(engine, 4096)} | "
                         f"{startup:.0f} s |")
            print(lines[-1], flush=True)
            del engine, model
            torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(GEMM_SHAPES), choices=list(GEMM_SHAPES))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["gemms", "sweep", "e2e"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[1, 32, 256], help="decode batch sizes end to end")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    ceiling = copy_bytes_per_s()
    header = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; device-to-device copy "
              f"{ceiling / 1e12:.2f} TB/s (read + written)", ""]
    print(header[0], flush=True)
    sections = []
    if "gemms" not in args.skip:
        sections += ["## GEMMs at decode shapes", ""] + bench_gemms(args.models, ceiling, deadline) + [""]
    if "e2e" not in args.skip:
        with tempfile.TemporaryDirectory() as root:
            e2e = bench_end_to_end(args.models, ceiling, deadline, Path(root), args.seqs)
            sections += ["## End to end", ""] + e2e + [""]
    if "sweep" not in args.skip:
        sections += ["## Tile sweep", ""] + sweep(args.models, deadline, ceiling)
    text = "\n".join(header + sections) + "\n"
    (args.out / "quant.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
