"""16-bit GEMV for decode at one sequence: y = x @ W^T + bias, x [M, K] (M small), W [N, K] as nn.Linear stores it.

cuBLAS picks latency-bound tiles for one row of the small projections (Falcon-H1-0.5B: an 8 x 64 tile for
4-8 MB weights, ~8.5 us where streaming takes ~2; RESULTS.md). Here each thread streams 16 contiguous bytes
of each of BLOCK_N weight rows per tile (every warp along K, so its x are one 16-byte load in the same layout:
no shuffles), keeps one fp32 partial per element it loaded, sums them once at the end, and the next tile's
loads are issued before this tile's multiply-adds. Split along K (kernels/split_k.py, one launch) when the
columns alone give too few programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.activation import load_x
from kernels.pdl import wait_for_predecessor
from kernels.split_k import split_for, split_k_launch, store_split_tile


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the matmul in float32, then the bias."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _w_tile(w_ptr, K, k0, offs_n, mask_n, BLOCK_K: tl.constexpr):
    """W [BLOCK_N, BLOCK_K] of the K tile at k0, zero past K."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                   other=0.0)


@triton.jit
def _x_tile(x_ptr, m, stride_xm, K, k0, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr):
    """x [BLOCK_K] of the K tile at k0, zero past K (SILU_MUL: SiLU(gate) * up, kernels/activation.py load_x)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return load_x(x_ptr + m * stride_xm + offs_k, offs_k < K, K, SILU_MUL)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, K_TILES, SPLIT_K,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Row program_id(1) of x times BLOCK_N rows of W over this split's K tiles (none past K). The first W
    tile is loaded before waiting on the kernel that wrote x (kernels/pdl.py). SILU_MUL: x is the gate half of
    [gate | up] rows (row stride stride_xm), multiplied as SiLU(gate) * up."""
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = tl.program_id(2) * K_TILES * BLOCK_K
    n_tiles = tl.minimum(K_TILES, tl.cdiv(K - k0, BLOCK_K))  # the last split may have fewer
    w = _w_tile(w_ptr, K, k0, offs_n, mask_n, BLOCK_K)
    wait_for_predecessor(USE_PDL)
    x = _x_tile(x_ptr, m, stride_xm, K, k0, BLOCK_K, SILU_MUL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(1, n_tiles):
        k0 += BLOCK_K
        next_w = _w_tile(w_ptr, K, k0, offs_n, mask_n, BLOCK_K)
        next_x = _x_tile(x_ptr, m, stride_xm, K, k0, BLOCK_K, SILU_MUL)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w, x = next_w, next_x
    acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    store_split_tile(y[None, :], b_ptr, out_ptr, part_ptr, count_ptr, m + tl.arange(0, 1), offs_n, M, N, SPLIT_K,
                     HAS_BIAS, SPLIT)


# Weights from this size on: cuBLAS streams them as fast (H200: Falcon-H1-7B gate+up 39.3 against 41.0 us,
# FalconMamba in_proj 34.3 against 36.4); below it the GEMV won at every projection (benchmarks/gemv.py).
GEMV_MAX_WEIGHTS = 1 << 26


def gemv_faster(x: torch.Tensor, weight: torch.Tensor, max_weights: float = GEMV_MAX_WEIGHTS) -> bool:
    """Whether one row of x times this 16-bit weight (fewer than max_weights elements) should take the GEMV
    rather than cuBLAS."""
    return (x.dim() == 2 and x.shape[0] == 1 and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.numel() < max_weights)


def gemv_config(N: int, K: int, device: torch.device, block_n: int = 4, num_warps: int | None = None,
                waves: float = 2) -> dict:
    """BLOCK_K = 16 bytes x 32 lanes x num_warps of 16-bit weights; split along K for ~waves programs an SM.
    Default warps (H200 sweep, benchmarks/gemv.py): enough that one tile covers K up to 2048 (0.5B's
    projections: 8 warps 2.9-3.3 us where 2 take 3.7-4.3), 2 for longer K (more programs an SM: the 7B's
    lm_head 187 us with 2, 195 with 4)."""
    if num_warps is None:
        num_warps = max(2, triton.next_power_of_2(K // 256)) if K <= 2048 else 2
    bk = 8 * 32 * num_warps
    return dict(BLOCK_N=block_n, BLOCK_K=bk, num_warps=num_warps, num_stages=1,
                SPLIT_K=split_for(triton.cdiv(N, block_n), K, bk, waves, device))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None, silu_mul: bool = False) -> torch.Tensor:
    """Triton version of gemv_ref (weight contiguous; config: tiles and split, default gemv_config).
    silu_mul: x is [M, 2K] = [gate | up] and the GEMV multiplies SiLU(gate) * up, computed as it loads x:
    gemv_ref(silu_mul_ref(gate, up), weight, bias) in one launch (the MLP's down projection)."""
    x = x.contiguous()
    if silu_mul:
        x = x[:, :x.shape[1] // 2]  # the gates, a view: each row's up follows its gate (row stride 2K)
    K, N = x.shape[1], weight.shape[0]
    cfg = config or gemv_config(N, K, x.device)
    return split_k_launch(_gemv_kernel, x, (weight,), bias, N, 1, cfg, SILU_MUL=silu_mul)
