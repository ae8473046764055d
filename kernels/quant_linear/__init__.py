"""GPTQ W4A16 / W8A16 linear layer: y = x @ dequantize(W)^T + bias, the integers dequantized in registers.

Runtime layout (engine/quantization/gptq.py builds it from a checkpoint):
    qweight [K / pack, N_W] int32, pack = 32 / bits: input channel k of output n sits in bits
            [(k % pack) * bits, (k % pack + 1) * bits) of qweight[k // pack, n]; N_W >= N, padded
    scales  [G, N_W] and zeros [G, N_W] (int16): input channel k belongs to group k // group_size
    perm    [K] or None: act-order checkpoints are reordered at load so that groups are contiguous;
            then the kernels read the input gathered, x[:, perm]
    W[n, k] = scales[k // group_size, n] * (q[k, n] - zeros[k // group_size, n])

Decoding streams the weights, so the kernels spend as few instructions per weight as they can:
- no int -> float conversion: a code q ORed into the mantissa of 2^23 (0x4B000000) reads as the fp32 number
  2^23 + q, and one subtraction of 2^23 + z gives q - z exactly. A code left in place at bit p of its word
  reads as 2^23 + q 2^p, so the codes of a word's low 16 bits are masked in place and the high 16 bits
  shifted down once; the 2^-p goes into the activation, which is loaded once for a whole row of words;
- the scale once per group and column, on the group's sum: sum_k x_k s (q_k - z) = s sum_k x_k (q_k - z);
- one row (decode at one sequence): a GEMV, no tensor cores; for weights of 2^23 codes and more, in half2 on
  CUDA (gemv_half2.py: x gathered and paired in fp16 inside the same launch, codes turned into fp16 by one
  lop3 on 1024 = 0x6400 two at a time, sub.f16x2 and fma.rn.f16x2, a column's sums added in fp16 over 4 word
  rows: ~2.4 SASS instructions a weight, Int4, where the fp32 GEMV, kind "gemv", spends ~5; the fp32 GEMV
  also runs smaller weights and, by default, off CUDA);
- 2 to 64 rows (decode at several sequences): the "planes" GEMM, tl.dot on exact (q - z) tiles in the
  activation dtype, one dot per code position j of the words ("plane" j: the channels pack r + j of word rows
  r) on the words as loaded. x is gathered once per call (act-order's perm and this order in one launch) so
  that each plane's channels are contiguous columns; Int4 with bf16 / fp16 x is dequantized on CUDA in
  bf16x2 / f16x2, two words at a time (their halves paired by two prmt, then per plane a shift, one lop3
  onto 128 = 0x4300 or 1024 = 0x6400 and one sub: about 1.5 instructions a weight, the pairs already as the
  tensor cores read them), else each plane by the fp32 2^23 trick. From 17 rows the same GEMM runs transposed
  (kind "planes_t": the dequantized plane the first operand, which Hopper's wgmma reads from registers);
- split along K so that even one row keeps every SM streaming (kernels/split_k.py: one launch), and
  act-order's gather of x done inside the kernel.
From 129 rows (kind "dequant": larger batches, prefills) each weight is dequantized into a 16-bit scratch
and multiplied by cuBLAS.

Files: reference.py (the torch references), codes.py (the 2^23 code reads every kernel shares), gemv.py (the
one-row fp32 GEMV), gemv_half2.py (the one-row half2 GEMV, its x gather and its tiles, half2_config), planes.py
(the planes GEMM, planes_t included), dequant.py (the dequantize kernel); here the kernel choice by rows
(matmul_config) and the launcher (gptq_linear).
"""

from __future__ import annotations

import torch
import triton

from kernels.quant_linear.dequant import gptq_dequantize
from kernels.quant_linear.gemv import _gptq_gemv_kernel
from kernels.quant_linear.gemv_half2 import gather_x_half2_ref, gptq_gemv_half2, half2_config, half2_pair_shift
from kernels.quant_linear.planes import _gptq_planes_kernel, _ptx_dequant, gather_x_planes, gather_x_planes_ref
from kernels.quant_linear.reference import dequantize_ref, gptq_linear_ref
from kernels.split_k import split_for, split_k_launch

__all__ = ["DEQUANT_MATMUL_MIN_ROWS", "HALF2_MIN_WEIGHTS", "dequantize_ref", "gather_x_half2_ref", "gather_x_planes",
           "gather_x_planes_ref", "gptq_dequantize", "gptq_gemv_half2", "gptq_linear", "gptq_linear_ref",
           "half2_config", "half2_pair_shift", "matmul_config"]

DEQUANT_MATMUL_MIN_ROWS = 129  # from here on (kind "dequant"): dequantize to 16 bits, then cuBLAS


def _tile_in_group(block_k: int, group_size: int, K: int) -> bool:
    return group_size >= K or group_size % block_k == 0


HALF2_MIN_WEIGHTS = 1 << 23  # one row of a weight from this size on: the half2 GEMV (predicted; below, the fp32 one)


def matmul_config(M: int, N: int, K: int, bits: int, group_size: int, device: torch.device) -> dict:
    """Kernel, tile sizes and split-K for an [M, K] x [K, N] GPTQ product: the best of benchmarks/quant.py's
    sweeps on the H200 at the 7B shapes (RESULTS.md). One row: the half2 GEMV from 2^23 weights, its tiles
    gemv_half2.half2_config (the previous half2 GEMV, with a separate gather launch: Int4 3072 x 24576 21.7
    against the fp32 GEMV's 29.3 us; the gather now in the GEMV's launch, which is why the half2 GEMV is
    predicted faster from 2^23 weights, not yet timed), the fp32 one below (1536 x 3072 6.3 us), 4 KB of Int4
    words a tile, about 4 programs per SM, 8 at N >= 8192; Int8 at N >= 8192 8 KB tiles, 4 warps, ~4 programs
    per SM. 2 to 64 rows: the planes GEMM, BLOCK_N 64, BLOCK_K
    128, 4 warps, 3 stages (the H200 sweep at 16 and 32 rows: best or within ~8% of it at every 7B and
    FalconMamba shape; 4 stages 2-7% slower) to 16 rows; from 17 rows its transposed kind planes_t (session 9's
    sweep, 7B and FalconMamba shapes: 0.76-0.97x the planes time at 32 rows, 0.67-0.86x at 64), BLOCK_N 64, 4
    warps, 3 stages to 32 rows, 2 to 64; to 128 rows Int4 64 x 128 tiles with 8 warps, Int8 128 x 64 with 4
    (the best at most shapes of 128 rows; 0.48-0.56x the time of the reshaping GEMM it replaced there). From
    129 rows the weight dequantized, then cuBLAS (faster than planes_t at 256 rows at 13 of the 16 shapes and
    formats, at 512 at all; at 128 rows at the small projections only)."""
    if M >= DEQUANT_MATMUL_MIN_ROWS:
        return dict(kind="dequant")
    if M == 1:
        # the half2 GEMV rounds x to fp16: on CUDA (where it is inline PTX) only; the interpreter and float32
        # models on the CPU keep the fp32 GEMV
        if device.type == "cuda" and K * N >= HALF2_MIN_WEIGHTS:
            return half2_config(N, K, bits, group_size, device)
        wide = N >= 8192
        bn, bk, warps, waves = (64, 128, 4, 4) if bits == 8 and wide else (64, 128, 2, 8 if wide else 4)
        while not _tile_in_group(bk, group_size, K):
            bk //= 2
        split = split_for(triton.cdiv(N, bn), K, bk, waves, device)
        return dict(kind="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=1)
    if M <= 16:  # a plane's dot needs 16 word rows: BLOCK_K 128 (Int4) / 64 (Int8) at least
        kind, bm, bn, bk, warps, stages = "planes", 16, 64, 128, 4, 3
    elif M <= 64:
        kind, bm, bn, bk, warps, stages = "planes_t", triton.next_power_of_2(M), 64, 128, 4, 3 if M <= 32 else 2
    else:
        kind, bk, stages = "planes_t", 128, 3
        bm, bn, warps = (64, 128, 8) if bits == 4 else (128, 64, 4)
    split = split_for(triton.cdiv(N, bn) * triton.cdiv(M, bm), K, bk, 4, device)
    return dict(kind=kind, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)


def gptq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                out_features: int | None = None, config: dict | None = None, silu_mul: bool = False) -> torch.Tensor:
    """Triton version of gptq_linear_ref (config: kernel and tiles, for benchmarks; default matmul_config).
    silu_mul (the GEMV kinds, i.e. one row): x is [M, 2K] = [gate | up] and the product is of SiLU(gate) * up,
    computed as x is loaded (the half2 GEMV: as it gathers x): gptq_linear_ref(silu_mul_ref(gate, up), ...) in the
    launches of the product alone."""
    x = x_full = x.contiguous()  # x_full: the [gate | up] rows with silu_mul
    if silu_mul:
        x = x[:, :x.shape[1] // 2]  # the gates, a view: each row's up follows its gate (row stride 2K)
    M, K = x.shape
    N_W = qweight.shape[1]
    N = out_features or N_W
    cfg = dict(config or matmul_config(M, N, K, bits, group_size, x.device))
    kind = cfg.pop("kind")
    assert not silu_mul or kind in ("gemv", "gemv_half2"), f"SiLU * mul in the loads of the GEMVs only, not {kind}"
    if kind == "dequant":
        if perm is not None:
            x = x.index_select(1, perm)
        w = gptq_dequantize(qweight, scales, zeros, bits, group_size, x.dtype)[:, :N]
        return torch.addmm(bias, x, w) if bias is not None else x @ w
    if kind == "gemv_half2":  # gathers x (by perm, SiLU * mul) itself, into a scratch row in the same launch
        return gptq_gemv_half2(x_full, qweight, scales, zeros, perm, bias, bits, group_size, N, cfg, silu_mul)
    if kind == "gemv":  # gathers x by perm itself: 128 values per [BLOCK_K / pack, BLOCK_N] words
        args = (qweight, scales, zeros, perm if perm is not None else qweight, N_W)
        return split_k_launch(_gptq_gemv_kernel, x, args, bias, N, 1, cfg, BITS=bits, GROUP=group_size,
                              HAS_PERM=perm is not None, SILU_MUL=silu_mul)
    tile_in_group = _tile_in_group(cfg["BLOCK_K"], group_size, K)
    if kind in ("planes", "planes_t"):  # x gathered (by perm) into plane order once here, not in each N tile's program
        assert tile_in_group or group_size % (32 // bits) == 0, "the planes GEMM needs groups of whole words"
        ptx = tile_in_group and _ptx_dequant(x.device, x.dtype, bits)
        return split_k_launch(_gptq_planes_kernel, x, (qweight, scales, zeros, N_W), bias, N, cfg["BLOCK_M"], cfg,
                              x_arg=gather_x_planes(x, perm, bits, cfg["BLOCK_K"]), BITS=bits, GROUP=group_size,
                              TILE_IN_GROUP=tile_in_group, PTX_DEQUANT=ptx, IEEE=x.dtype == torch.float32,
                              SWAP=kind == "planes_t")
    raise ValueError(f"unknown GPTQ kernel kind {kind!r}")
