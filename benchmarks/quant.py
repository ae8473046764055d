"""Quantized weights on the GPU: each projection GEMM at decode shapes against the measured copy ceiling,
then end to end (benchmarks/offline.py's machinery, random weights with the published shapes) for bf16,
GPTQ-Int4, GPTQ-Int8 (group 128, act-order) and FP8.

    python -m benchmarks.quant --out OUT_DIR [--models falcon-h1-7b falcon-mamba-7b] [--budget-s 420]
        [--seqs 1 32 256] [--variants bf16 gptq-int4 fp8 gptq-int8] [--max-num-seqs 256]
        [--order gemms e2e sweep] [--skip gemms sweep e2e]
        [--sweep-rows 1 16 32] [--sweep-formats gptq-int4 ...] [--sweep-kinds planes_t ...] [--check-procs 8]
        [--checked OUT/checked.json]
    (benchmarks/quant_gpu.sh runs issue 13's whole GPU set in one device call)

GEMMs: weights bf16 (torch.nn.functional.linear, cuBLAS), GPTQ 4/8-bit (kernels/quant_linear/), FP8
weight-only (Triton) and FP8 as the engine runs it (kernels/fp8_linear.py: weight-only below 128 rows,
torch._scaled_mm with activations quantized per row from there). Each timing is a CUDA
graph of calls that cycle through enough weight copies to miss the 50-60 MB L2, replayed; "achieved" is
weight bytes (codes, scales and zero points included) per call over the time, against a device-to-device
copy (bytes read + written, benchmarks/ceilings.py). The sweep tries GPTQ (GEMVs, the planes GEMM in both
orientations, dequantize + cuBLAS) and FP8 weight-only tile configs at --sweep-rows rows, each checked against the
reference, against the default heuristic. End to end: decode tok/s at --seqs
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

from benchmarks.ceilings import copy_bytes_per_s, graph_replay_seconds
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
    # out_proj|o_proj: both read into the same residual sum, so one GEMM over [y | o] could replace the two
    # (timed to see whether it pays before building it)
    "falcon-h1-7b": {"in_proj+qkv": (3072, 8728), "out_proj": (3072, 3072), "o_proj": (1536, 3072),
                     "out_proj|o_proj": (4608, 3072), "gate+up": (3072, 24576), "down": (12288, 3072)},
    "falcon-mamba-7b": {"in_proj": (4096, 16384), "out_proj": (8192, 4096)},
}
GPTQ_CONFIG = dict(quant_method="gptq", group_size=128, desc_act=True, sym=True, checkpoint_format="gptq",
                   lm_head=False)
VARIANTS = {"bf16": None, "gptq-int4": 4, "fp8": "fp8", "gptq-int8": 8}  # measured in this order
L2_MISS_BYTES = 256 << 20  # several times the 50-60 MB L2


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
    # scales and zero points differ by group, so a kernel that reads a tile's weights with another group's
    # scale fails the sweep's check
    scales = (torch.rand((K // 128, n_w), device="cuda", generator=gen) * 0.002 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (K // 128, n_w), device="cuda", generator=gen, dtype=torch.int16)
    perm = torch.randperm(K, device="cuda", generator=gen).to(torch.int32)

    def fn(x, w, config=None):
        return ql.gptq_linear(x, w[0], w[1], w[2], w[3], None, bits, 128, N, config=config)

    return fn, (qweight, scales, zeros, perm), qweight.nbytes + scales.nbytes + zeros.nbytes + perm.nbytes


def gemm_time(fn, weights: list, x: torch.Tensor, **kwargs) -> float:
    return graph_replay_seconds(lambda: [fn(x, w, **kwargs) for w in weights], reps=5) / len(weights)


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
    """The tile configs the sweep tries: at one row the half2 GEMV (the default) and the fp32 one it replaced
    (tiles of 8-32 word rows, 2-4 warps); at more rows the planes GEMM (the default to 16 rows: BLOCK_M the
    rows rounded up to 16 / 32 / 64 and the next size, BLOCK_N 64 / 128, BLOCK_K 128 / 256, 4 / 8 warps, 2-4
    stages) and the transposed one (planes_t_candidates), each split for several waves of programs, and the
    weights dequantized to bf16 then cuBLAS (kind dequant)."""
    pack, dev = 32 // bits, torch.device("cuda")
    out = []
    if M == 1:
        tiles = [("gemv", bn, rows * pack, warps) for bn, rows, warps in ((64, 16, 2), (64, 32, 2), (128, 16, 4))]
        tiles += [("gemv_half2", bn, rows * pack, warps) for bn, rows, warps in
                  ((64, 16, 2), (128, 16, 4), (64, 8, 2), (128, 8, 2), (256, 8, 4), (64, 32, 4))]
        out += [dict(kind=kind, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1,
                     SPLIT_K=split_for(-(-N // bn), K, bk, waves, dev))
                for kind, bn, bk, warps in tiles if bk <= 128  # a K tile lies in one group of 128
                for waves in (4, 8)]
        return out
    out += planes_t_candidates(M, N, K) + [dict(kind="dequant")]
    fits = 16 if M <= 16 else 32 if M <= 32 else 64  # as matmul_config picks it
    for bm in sorted({fits, min(2 * fits, 64)}):
        for bn, bk, warps in ((64, 128, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (128, 256, 8)):
            tiles = -(-N // bn) * -(-M // bm)
            for stages in (2, 3, 4):
                out += [dict(kind="planes", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                             SPLIT_K=split_for(tiles, K, bk, waves, dev)) for waves in (4, 8)]
    return out


def planes_t_candidates(M: int, N: int, K: int) -> list[dict]:
    """The transposed planes GEMM: BLOCK_M the rows' power of two (at least 16), from 65 rows 64 and 128 (256
    spill: two fp32 accumulators of 128 x 256; so do 128 x 128 a warpgroup); BLOCK_N 64 / 128, 4 / 8 warps,
    2-4 stages; BLOCK_K 128 only (256 spans two groups of 128: each weight scaled in fp32, no bf16x2
    dequantization); split for 4 and 8 waves."""
    dev = torch.device("cuda")
    fits = max(16, 1 << (M - 1).bit_length())
    tiles_nk = ((64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 128, 4, 2)) if fits <= 64 else \
        ((64, 128, 4, 3), (128, 128, 8, 3), (64, 128, 4, 2), (64, 128, 4, 4))
    out = []
    for bm in ((fits,) if fits <= 64 else (64, 128)):
        for bn, bk, warps, stages in tiles_nk:
            tiles = -(-N // bn) * -(-M // bm)
            out += [dict(kind="planes_t", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                         SPLIT_K=split_for(tiles, K, bk, waves, dev)) for waves in (4, 8)]
    return out


def fp8_candidates(M: int, N: int, K: int) -> list[dict]:
    """FP8 weight-only: at one row the GEMV (2-16 W rows a program, 2-8 warps along K, 8 or 16 bytes of a row a
    thread), and the tl.dot kernel at any."""
    dev = torch.device("cuda")
    out = []
    if M == 1:
        out += [fp8.gemv_config(N, K, bn, warps, waves, dev, vec)
                for vec in (8, 16) for bn, warps in ((2, 4), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4), (8, 8), (16, 8))
                for waves in (4, 8, 16)]
    bm = 16 if M <= 16 else 32
    out += [dict(kind="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=4,
                 SPLIT_K=split_for(-(-N // bn) * -(-M // bm), K, bk, waves, dev))
            for bn, bk in ((32, 128), (64, 128), (64, 256)) for waves in (2, 4)]
    return out


SWEEP_FORMATS = ("gptq-int4", "gptq-int8", "fp8 weight-only")


def sweep_cases(models: list[str], rows: list[int], formats: list[str], kinds: list[str] | None) -> list[tuple]:
    """(K, N, format, rows, kinds), the first of `rows` for every shape first; kinds: the candidates' kinds
    kept (None: all)."""
    kept = tuple(kinds) if kinds else None
    return [(K, N, fmt, m, kept) for m in rows for model in models for K, N in GEMM_SHAPES[model].values()
            for fmt in formats]


def _case_inputs(case: tuple) -> tuple:
    """(fn, weights, bytes, x, candidates, reference) of a sweep case, the same in every process (seeded)."""
    K, N, fmt, rows, kinds = case
    gen = torch.Generator(device="cuda").manual_seed(K * 7 + N + rows)
    fn, w, nbytes = make_weights(fmt, K, N, gen)
    x = torch.randn(rows, K, device="cuda", generator=gen).to(torch.bfloat16)
    if fmt == "fp8 weight-only":
        cands, ref = fp8_candidates(rows, N, K), fp8.fp8_linear_ref(x, *w, None)
    else:
        bits = 4 if fmt == "gptq-int4" else 8
        cands, ref = gptq_candidates(rows, N, K, bits), ql.gptq_linear_ref(x, *w[:4], None, bits, 128, N)
    cands = [c for c in cands if kinds is None or c["kind"] in kinds]
    unique = [dict(c) for c in dict.fromkeys(tuple(c.items()) for c in cands)]  # waves that give the same split
    return fn, w, nbytes, x, unique, ref


def check_case(case: tuple) -> list[str]:
    """Each candidate of a case run once against the reference (this compiles it, into Triton's disk cache):
    'ok', 'wrong: err' or 'failed: why' per candidate."""
    fn, w, _, x, cands, ref = _case_inputs(case)
    verdicts = []
    for cfg in cands:
        try:
            err = ((fn(x, w, config=cfg).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            verdicts.append("ok" if err < 1e-2 else f"wrong: {err:.3g}")
        except Exception as e:  # e.g. a tile that needs more shared memory than there is
            verdicts.append(f"failed: {str(e)[:100]}")
    fn(x, w)  # and the default heuristic's
    return verdicts


def check_cases(cases: list[tuple], procs: int) -> list[list[str]]:
    """check_case for every case, `procs` processes at once (Triton compiles on the CPU: in parallel, the
    timing that follows finds every kernel in the disk cache)."""
    start = time.perf_counter()
    with torch.multiprocessing.get_context("spawn").Pool(procs) as pool:
        verdicts = pool.map(check_case, cases, chunksize=1)
    bad = sum(v != "ok" for vs in verdicts for v in vs)
    print(f"checked {sum(map(len, verdicts))} configs of {len(cases)} cases in {time.perf_counter() - start:.0f} s: "
          f"{bad} not ok", flush=True)
    return verdicts


def sweep(cases: list[tuple], deadline: float, ceiling: float, procs: int, checked: Path | None) -> list[str]:
    """bf16 (cuBLAS), the default heuristic and every candidate config side by side, GPTQ 4 / 8 bits and FP8
    weight-only at `rows`; the best per kernel kind. The candidates are first checked against the reference
    (and compiled) in `procs` processes at once, or were, by `--order check` into `checked`; only the ones
    that agree are timed."""
    verdicts = json.loads(checked.read_text()) if checked else check_cases(cases, procs)
    lines = ["| GEMM (K x N) | format | rows | bf16 us | default us (of copy ceiling) | best us (of copy ceiling) | "
             "best config | best gemv us | best gemm us | best planes us | best planes_t us | dequant + cuBLAS us | "
             "wrong |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bf16_us = {}
    for case, verdict in zip(cases, verdicts):
        if time.perf_counter() > deadline:
            return lines + ["", "(time budget reached)"]
        K, N, fmt, rows, _ = case
        fn, w, nbytes, x, cands, _ = _case_inputs(case)
        if (K, N, rows) not in bf16_us:
            bf16_fn, bf16_w, bf16_bytes = make_weights("bf16", K, N, torch.Generator(device="cuda").manual_seed(0))
            bf16_us[K, N, rows] = gemm_time(bf16_fn, _copies(bf16_w, bf16_bytes), x) * 1e6
        copies = _copies(w, nbytes)
        default_t = gemm_time(fn, copies, x)
        best, by_kind = (default_t, "default"), {}
        for cfg, v in zip(cands, verdict):
            if v != "ok":
                print(f"{fmt} {K}x{N} rows {rows} {cfg}: {v}", flush=True)
                continue
            t = gemm_time(fn, copies, x, config=cfg)
            kind = cfg["kind"]
            by_kind[kind] = min(by_kind.get(kind, 1.0), t)
            best = min(best, (t, cfg), key=lambda b: b[0])
        wrong = sum(v.startswith("wrong") for v in verdict)
        lines.append(f"| {K} x {N} | {fmt} | {rows} | {bf16_us[K, N, rows]:.1f} | {default_t * 1e6:.1f} "
                     f"({nbytes / default_t / ceiling:.0%}) | {best[0] * 1e6:.1f} ({nbytes / best[0] / ceiling:.0%}) | "
                     f"{best[1]} | {by_kind.get('gemv', 0) * 1e6:.1f} | {by_kind.get('gemm', 0) * 1e6:.1f} | "
                     f"{by_kind.get('planes', 0) * 1e6:.1f} | {by_kind.get('planes_t', 0) * 1e6:.1f} | "
                     f"{by_kind.get('dequant', 0) * 1e6:.1f} | {wrong} |")
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


def bench_end_to_end(models: list[str], ceiling: float, deadline: float, root: Path, seqs: list[int],
                     max_num_seqs: int, variants: list[str]) -> list[str]:
    """Each model in bf16 (always, first: what the bytes column compares with) and in `variants`."""
    decode = " | ".join(f"decode {n} seq" for n in seqs)
    lines = [f"| model | weights | projections' bytes vs bf16 | {decode} | prefill 4,096 | 4k seqs that fit | "
             "start-up |",
             "|---|---|---|" + "---|" * len(seqs) + "---|---|---|"]
    for name in models:
        bf16_projection_bytes = None
        for variant in dict.fromkeys(["bf16", *variants]):
            if time.perf_counter() > deadline:
                return lines + ["", "(time budget reached: remaining models not measured)"]
            start = time.perf_counter()
            args = EngineArgs(model=str(model_dir(name, variant, root)), device="cuda", dtype="bfloat16",
                              load_format="dummy", max_model_len=4096 + 64, max_num_seqs=max_num_seqs,
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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="end to end: the weight formats (bf16 is always measured, first)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="end to end: the engine's (graphs captured "
                        "up to it; state slots, so it caps '4k seqs that fit')")
    parser.add_argument("--sweep-rows", nargs="+", type=int, default=[1, 16, 32])
    parser.add_argument("--sweep-formats", nargs="+", default=list(SWEEP_FORMATS), choices=SWEEP_FORMATS)
    parser.add_argument("--sweep-kinds", nargs="+", help="only these kinds' candidate configs (default: all; "
                        "the default heuristic and bf16 are timed anyway)")
    parser.add_argument("--check-procs", type=int, default=8, help="processes that check (and compile) the sweep's "
                        "candidates at once")
    parser.add_argument("--order", nargs="+", default=["gemms", "e2e", "sweep"],
                        choices=["gemms", "sweep", "e2e", "check"],
                        help="what to run, in this order; check: only the sweep's reference checks (and compiles)")
    parser.add_argument("--checked", type=Path, help="the sweep's reference checks, from an earlier --order check "
                        "with the same --models and --sweep-rows (OUT/checked.json)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    ceiling = copy_bytes_per_s()
    header = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; device-to-device copy "
              f"{ceiling / 1e12:.2f} TB/s (read + written)", ""]
    print(header[0], flush=True)
    sections = []
    cases = sweep_cases(args.models, args.sweep_rows, args.sweep_formats, args.sweep_kinds)
    for part in args.order:
        if part in args.skip:
            continue
        if part == "gemms":
            sections += ["## GEMMs at decode shapes", ""] + bench_gemms(args.models, ceiling, deadline) + [""]
        elif part == "e2e":
            with tempfile.TemporaryDirectory() as root:
                e2e = bench_end_to_end(args.models, ceiling, deadline, Path(root), args.seqs, args.max_num_seqs,
                                       args.variants)
            sections += ["## End to end", ""] + e2e + [""]
        elif part == "check":
            verdicts = check_cases(cases, args.check_procs)
            (args.out / "checked.json").write_text(json.dumps(verdicts))
        else:
            sections += ["## Tile sweep", ""] + sweep(cases, deadline, ceiling, args.check_procs, args.checked) + [""]
        (args.out / "quant.md").write_text("\n".join(header + sections) + "\n")  # what is done so far
    text = "\n".join(header + sections) + "\n"
    (args.out / "quant.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
