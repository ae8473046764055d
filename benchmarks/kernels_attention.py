"""GPU benchmark of the attention-path Triton kernels at Falcon-H1-7B shapes (Hq 12, Hkv 2, head_dim 128,
block size 16, bf16): paged decode attention (bandwidth: K/V bytes read), causal prefill attention (TFLOP/s)
against torch SDPA per backend (flash, cuDNN, torch's own choice) on the same data made contiguous, rms_norm /
add_rms_norm (bandwidth). Times are triton.testing.do_bench medians, decode and prefill also replayed from a
CUDA graph, as the server runs them (the prefill rates are from the replay).

    python benchmarks/kernels_attention.py --out benchmarks/results_kernels_attention.md [--sweep]

--sweep also times alternative decode / prefill launch settings (module constants; the prefill's
PREFILL_CANDIDATES) to pick the defaults. The prefill reads the new tokens' K / V densely from new_kv, as the
model passes it; "prefill, pages only" is the kernel without it (every key through the block table).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ceilings import Ceilings, measure_ceilings
from benchmarks.report import emit
from kernels import attention, norm  # noqa: E402
from kernels.attention import decode, prefill  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, HIDDEN = 12, 2, 128, 16, 3072
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of fn (do_bench, eager launches)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def bench_graph(fn: Callable[[], object]) -> float:
    """Median seconds of fn replayed from a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def paged_batch(seqs: list[tuple[int, int]], num_decodes: int) -> dict:
    """Caches holding exactly the batch's blocks, handed out in shuffled order; (n_new, seq_len) per sequence.
    new_k / new_v: the new tokens' K / V copied out of their slots, halves of one [2, T, Hkv, D] buffer (the
    model's rope_write_kv output)."""
    blocks = [triton.cdiv(s, BLOCK_SIZE) for _, s in seqs]
    order = torch.randperm(sum(blocks), device="cuda").int()
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for b, count in enumerate(blocks):
        tables[b, :count] = order[used: used + count]
        used += count
    shape = (sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    new = [n for n, _ in seqs]
    k_cache, v_cache = (torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(2))
    positions = torch.cat([torch.arange(s - n, s, device="cuda") for n, s in seqs])
    rows = torch.cat([torch.full((n,), b, device="cuda") for b, (n, _) in enumerate(seqs)])
    slots = tables[rows, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    new_kv = torch.stack([cache.flatten(0, 1)[slots] for cache in (k_cache, v_cache)])
    return dict(
        q=torch.randn(sum(new), Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE), k_cache=k_cache, v_cache=v_cache,
        query_start_loc=torch.tensor([0] + new, device="cuda").cumsum(0).int(),
        seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device="cuda"),
        block_tables=tables, scale=SCALE, num_decodes=num_decodes, max_query_len=max(new),
        max_seq_len=max(s for _, s in seqs), new_k=new_kv[0], new_v=new_kv[1],
    )


def attend(batch: dict) -> Callable[[], torch.Tensor]:
    return lambda: attention.paged_attention(**batch)


def pages_only(batch: dict) -> dict:
    """The batch without new_k / new_v: the kernel reads every key through the block table."""
    return {k: v for k, v in batch.items() if k not in ("new_k", "new_v")}


def decode_rows(sweep: bool, peaks: Ceilings) -> list[list[str]]:
    rows = []
    for num_seqs, ctx in ((1, 4096), (32, 4096), (256, 4096), (1, 32768)):
        batch = paged_batch([(1, ctx)] * num_seqs, num_seqs)
        kv_bytes = num_seqs * ctx * KV_HEADS * HEAD_DIM * 2 * batch["k_cache"].element_size()
        settings = [(decode.DECODE_BLOCK_N, decode.DECODE_PROGRAMS_PER_SM, decode.DECODE_NUM_WARPS,
                     decode.DECODE_NUM_STAGES)]
        if sweep:
            settings += [(bn, pps, 4, 2) for bn in (64, 128) for pps in (1, 2, 4)]
            settings += [(64, 2, 4, 3), (64, 2, 8, 2), (128, 2, 8, 3)]
            settings = list(dict.fromkeys(settings))
        defaults = settings[0]
        for bn, pps, w, st in settings:
            decode.DECODE_BLOCK_N, decode.DECODE_PROGRAMS_PER_SM = bn, pps
            decode.DECODE_NUM_WARPS, decode.DECODE_NUM_STAGES = w, st
            splits = decode.decode_splits(num_seqs, KV_HEADS, ctx, torch.device("cuda"))
            t, tg = bench(attend(batch)), bench_graph(attend(batch))
            name = "decode" if (bn, pps, w, st) == defaults else f"decode BLOCK_N={bn} per_SM={pps} w={w} st={st}"
            rows.append([name, f"{num_seqs} x {ctx} ({splits} splits)", f"{t * 1e6:.1f}",
                         f"{tg * 1e6:.1f} ({kv_bytes / tg / 1e9:.0f} GB/s)", f"{kv_bytes / 2**20:.0f} MiB",
                         f"{kv_bytes / t / 1e9:.0f} GB/s", f"{kv_bytes / t / peaks.hbm_bytes_per_s:.0%}"])
        (decode.DECODE_BLOCK_N, decode.DECODE_PROGRAMS_PER_SM, decode.DECODE_NUM_WARPS,
         decode.DECODE_NUM_STAGES) = defaults
        del batch
    return rows


def causal_flops(n_new: int, seq_len: int) -> float:
    """QK^T and PV FLOPs of n_new queries ending at seq_len (query i sees seq_len - n_new + i + 1 keys)."""
    keys = n_new * (seq_len - n_new) + n_new * (n_new + 1) // 2
    return 4.0 * Q_HEADS * HEAD_DIM * keys


def name_of(cfg: dict | None) -> str:
    return "prefill" if cfg is None else "prefill " + " ".join(f"{k}={v}" for k, v in cfg.items())


# Prefill tile settings the sweep times (bf16; DESCRIPTORS: the new keys through TMA; the defaults keep one
# BLOCK_N for all chunk lengths, see _prefill_config). Shared memory and registers per thread of each from its
# sm_90a compile at the 7B shapes (triton 3.6 on a CPU, ptxas -v), and the CTAs an H200 SM then holds (228 KiB,
# 64K registers): no spills unless noted.
PREFILL_CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, DESCRIPTORS=True),  # 161 KiB, 255 regs: 1 CTA
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, DESCRIPTORS=True),  # 225 KiB, 255 + 20 B spills: 1
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, DESCRIPTORS=True),  # 129 KiB, 191: 1
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, DESCRIPTORS=True),  # 81 KiB, 195: 2
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, DESCRIPTORS=True),  # 113 KiB, 194: 2 if it fits
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, DESCRIPTORS=True),  # 65 KiB, 148: 3
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, DESCRIPTORS=False),  # 224 KiB, 255 + 144 B spills: 1
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, DESCRIPTORS=False),  # 112 KiB, 250: 2 if it fits
]
# the old default, every key through the pages: 81 KiB, 204 regs, 2 CTAs
PAGES_ONLY_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, DESCRIPTORS=False)

# (sequences, new tokens, context) of the prefill cases: every sequence of a case has the same lengths, so SDPA
# can take the case as one dense batch.
PREFILL_CASES = ((1, 4096, 4096), (1, 2048, 4096), (16, 256, 256), (4, 1024, 4096))
SDPA_BACKENDS = {"flash": [SDPBackend.FLASH_ATTENTION], "cuDNN": [SDPBackend.CUDNN_ATTENTION],
                 "torch's choice": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}


def contiguous_qkv(batch: dict, num_seqs: int, n_new: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """The batch's q [B, Hq, n_new, D] and its context's K, V [B, Hq, seq_len, D] (KV heads repeated), contiguous:
    the same data as the pages hold, as SDPA takes it."""
    blocks = batch["block_tables"][:, : triton.cdiv(seq_len, BLOCK_SIZE)].long()
    q = batch["q"].view(num_seqs, n_new, Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    k, v = (cache[blocks].flatten(1, 2)[:, :seq_len].repeat_interleave(Q_HEADS // KV_HEADS, 2).transpose(1, 2)
            .contiguous() for cache in (batch["k_cache"], batch["v_cache"]))
    return q, k, v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal SDPA restricted to one backend (or torch's choice), aligned bottom-right when the queries are the
    last of a longer context."""
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              scale=SCALE)


def prefill_rows(sweep: bool, peaks: Ceilings) -> list[list[str]]:
    """Per case: the paged Triton kernel (its tile settings with --sweep) and torch SDPA on the same data made
    contiguous, per backend; every output checked against paged_attention_ref first."""
    rows = []
    for num_seqs, n_new, seq_len in PREFILL_CASES:
        batch = paged_batch([(n_new, seq_len)] * num_seqs, 0)
        flops = num_seqs * causal_flops(n_new, seq_len)
        shape = f"{num_seqs} x ({n_new} new + {seq_len - n_new} cached)"
        ref = attention.paged_attention_ref(**batch)
        q, k, v = contiguous_qkv(batch, num_seqs, n_new, seq_len)
        default = prefill._prefill_config(DTYPE, n_new)
        candidates = {"prefill (paged, Triton)": attend(batch),
                      "prefill, pages only " + name_of(PAGES_ONLY_CONFIG)[8:]:
                      functools.partial(prefill_with, PAGES_ONLY_CONFIG, pages_only(batch))}
        for backend in SDPA_BACKENDS:
            candidates[f"torch SDPA {backend} (contiguous)"] = functools.partial(sdpa, q, k, v, backend)
        if sweep:
            for cfg in PREFILL_CANDIDATES:
                if cfg != default:
                    candidates[name_of(cfg)] = functools.partial(prefill_with, cfg, batch)
        times = {}
        for name, fn in candidates.items():
            try:
                out = fn()
                if out.dim() == 4:  # SDPA's [B, H, n_new, D]
                    out = out.transpose(1, 2).reshape(ref.shape)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                assert err < 1e-2, f"{name}: max |out - ref| / max |ref| = {err:.1e}"
                t, tg = bench(fn), bench_graph(fn)
            except Exception as e:  # no such kernel for this case (out of resources, compile error, backend)
                rows.append([name, shape, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", "", "", ""])
                print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)
                continue
            times[name] = tg
            rows.append([name, shape, f"{t * 1e6:.1f}", f"{tg * 1e6:.1f}", f"{flops / 1e9:.1f} GFLOP",
                         f"{flops / tg / 1e12:.0f} TFLOP/s", f"{flops / tg / peaks.bf16_flops:.0%}"])
            print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)
        ours = {name: t for name, t in times.items() if name.startswith("prefill") and "pages only" not in name}
        if ours:
            best = min(ours, key=ours.get)
            print(f"BEST {shape}: {best} {ours[best] * 1e6:.1f} us (default {name_of(default)[8:]}: "
                  f"{times.get('prefill (paged, Triton)', float('nan')) * 1e6:.1f} us; cuDNN "
                  f"{times.get('torch SDPA cuDNN (contiguous)', float('nan')) * 1e6:.1f} us)", flush=True)
        del batch, ref, q, k, v
    return rows


def prefill_with(cfg: dict, batch: dict) -> torch.Tensor:
    """The Triton prefill kernel under other tile settings."""
    default = prefill._prefill_config
    prefill._prefill_config = lambda dtype, max_query_len: cfg
    try:
        return attention.paged_attention(**batch)
    finally:
        prefill._prefill_config = default


def norm_rows(sweep: bool, peaks: Ceilings) -> list[list[str]]:
    rows = []
    default_launch = norm._row_launch
    launches = [None]
    if sweep:
        launches += [(r, w) for r, w in ((1, 4), (1, 16), (2, 8), (4, 16))]
    for launch in launches:
        if launch is not None:
            norm._row_launch = lambda n_rows, block_n, r=launch[0], w=launch[1]: (r, triton.cdiv(n_rows, r), w)
        rows += norm_case_rows("" if launch is None else f" rows={launch[0]} w={launch[1]}", peaks)
        norm._row_launch = default_launch
    return rows


def norm_case_rows(suffix: str, peaks: Ceilings) -> list[list[str]]:
    rows = []
    for num_rows in (256, 4096):
        x, residual = (torch.randn(num_rows, HIDDEN, device="cuda", dtype=DTYPE) for _ in range(2))
        w = torch.rand(HIDDEN, device="cuda", dtype=DTYPE) + 0.5
        size = num_rows * HIDDEN * x.element_size()
        cases = (("rms_norm", norm.rms_norm, norm.rms_norm_ref, (x, w, 1e-5), 2 * size),
                 ("add_rms_norm", norm.add_rms_norm, norm.add_rms_norm_ref, (x, residual, w, 1e-5), 4 * size))
        for name, fn, ref, fn_args, nbytes in cases:
            t, t_ref = bench(functools.partial(fn, *fn_args)), bench(functools.partial(ref, *fn_args))
            rows.append([name + suffix, f"[{num_rows}, {HIDDEN}]", f"{t * 1e6:.1f}", f"torch ref {t_ref * 1e6:.1f}",
                         f"{nbytes / 2**20:.1f} MiB", f"{nbytes / t / 1e9:.0f} GB/s",
                         f"{nbytes / t / peaks.hbm_bytes_per_s:.0%}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch settings")
    parser.add_argument("--only", nargs="+", choices=("decode", "prefill", "norm"),
                        default=("decode", "prefill", "norm"), help="kernel groups to time")
    args = parser.parse_args()
    peaks = measure_ceilings()
    torch.manual_seed(0)
    header = ["kernel", "shape", "time (us)", "CUDA graph (us)", "bytes / work", "achieved", "of peak"]
    groups = {"decode": decode_rows, "prefill": prefill_rows, "norm": norm_rows}
    rows = [row for name in args.only for row in groups[name](args.sweep, peaks)]
    lines = [
        f"Falcon-H1-7B attention-path kernels, {datetime.date.today().isoformat()}, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}. "
        f"Peaks measured in this run: copy {peaks.hbm_bytes_per_s / 1e12:.2f} TB/s, "
        f"bf16 matmul {peaks.bf16_flops / 1e12:.0f} TFLOP/s. Decode bytes = K + V read; norm bytes = reads + writes.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
