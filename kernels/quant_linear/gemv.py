"""The one-row fp32 GEMV, no tensor cores (kind "gemv"): x gathered by perm as it is loaded, each code read
as an exact fp32 number (codes.py) and multiplied-added in fp32. matmul_config picks it below
HALF2_MIN_WEIGHTS and off CUDA; the half2 GEMV (kind "gemv_half2") is gemv_half2.py. Reference: reference.py
gptq_linear_ref at one row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.activation import load_x
from kernels.pdl import wait_for_predecessor
from kernels.quant_linear.codes import TWO_23, _code, _input_channels
from kernels.split_k import store_split_tile


@triton.jit
def _columns(t, PACK: tl.constexpr):
    """The PACK columns of t [R, PACK] (PACK = 4 or 8), each [R]."""
    R: tl.constexpr = t.shape[0]
    if PACK == 8:
        even, odd = tl.split(tl.reshape(t, (R, 4, 2)))
        c0, c2 = tl.split(tl.reshape(even, (R, 2, 2)))
        c1, c3 = tl.split(tl.reshape(odd, (R, 2, 2)))
        x0, x4 = tl.split(c0)
        x2, x6 = tl.split(c2)
        x1, x5 = tl.split(c1)
        x3, x7 = tl.split(c3)
        return x0, x1, x2, x3, x4, x5, x6, x7
    else:
        even, odd = tl.split(tl.reshape(t, (R, 2, 2)))
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3


@triton.jit
def _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The fp32 GEMV's weight loads for the K tile at k0 (a tile lies in one group): its word rows, words
    [BLOCK_K / pack, BLOCK_N], and the group's scales [BLOCK_N] (fp32) and zero points [BLOCK_N] (as stored);
    nothing at or past k_end."""
    PACK: tl.constexpr = 32 // BITS
    rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    mask_n = offs_n < N_W
    words = tl.load(qw_ptr + rows[:, None] * N_W + offs_n[None, :],
                    mask=(rows < k_end // PACK)[:, None] & mask_n[None, :], other=0)
    g = tl.minimum(k0, K - 1) // GROUP
    in_range = mask_n & (offs_n * 0 + k0 < k_end)
    scale = tl.load(s_ptr + g * N_W + offs_n, mask=in_range, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g * N_W + offs_n, mask=in_range, other=0)
    return rows, words, scale, zero


@triton.jit
def _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, N_W, K, m, stride_xm, k0, k_end, offs_n,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The fp32 GEMV's loads for the K tile at k0: _word_tile's, zero points in fp32, and x [BLOCK_K / pack,
    pack]; nothing at or past k_end."""
    rows, words, scale, zero = _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP, BLOCK_K)
    xt = _gemv_x(x_ptr, perm_ptr, m, stride_xm, rows, K, k_end, BITS, HAS_PERM, SILU_MUL)
    return words, scale, zero.to(tl.float32), xt


@triton.jit
def _gemv_x(x_ptr, perm_ptr, m, stride_xm, rows, K, k_end, BITS: tl.constexpr, HAS_PERM: tl.constexpr,
            SILU_MUL: tl.constexpr):
    """x [BLOCK_K / pack, pack] of the word rows `rows` (gathered by perm; SILU_MUL: SiLU(gate) * up of
    [gate | up] rows, kernels/activation.py load_x); nothing at or past k_end."""
    PACK: tl.constexpr = 32 // BITS
    k = rows[:, None] * PACK + tl.arange(0, PACK)[None, :]
    return load_x(x_ptr + m * stride_xm + _input_channels(perm_ptr, k, k_end, HAS_PERM), k < k_end, K, SILU_MUL)


@triton.jit
def _gptq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, N_W, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
                      stride_xm, K_TILES, SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One row of x (program_id(1)) times BLOCK_N columns of W^T over K_TILES tiles of K, in fp32 multiply-adds.
    A K tile lies in one group. The next tile's loads are issued before this tile's arithmetic, so each
    program keeps two tiles in flight (at one row the kernel waits on memory latency more than on bandwidth);
    the first tile's weights before waiting on the kernel that wrote x (kernels/pdl.py). SILU_MUL: x is the gate
    half of [gate | up] rows (row stride stride_xm), multiplied as SiLU(gate) * up."""
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PACK
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(2) * K_TILES * BLOCK_K
    k_end = tl.minimum(k0 + K_TILES * BLOCK_K, K)
    rows, words, scale, zero = _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP, BLOCK_K)
    zero = zero.to(tl.float32)
    wait_for_predecessor(USE_PDL)
    xt = _gemv_x(x_ptr, perm_ptr, m, stride_xm, rows, K, k_end, BITS, HAS_PERM, SILU_MUL)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for _ in range(K_TILES):
        k0 += BLOCK_K
        next_tile = _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, N_W, K, m, stride_xm, k0, k_end, offs_n,
                               BITS, GROUP, HAS_PERM, SILU_MUL, BLOCK_K)
        high = words >> 16
        xs = _columns(xt.to(tl.float32), PACK)
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PACK):
            code, pos = _code(words, high, j, BITS, True)
            w = code - (zero * pos + TWO_23)[None, :]  # (q - z) 2^P
            part += (xs[j] * (1.0 / pos))[:, None] * w
        acc += part * scale[None, :]
        words, scale, zero, xt = next_tile
    y = tl.sum(acc, axis=0)[None, :]
    store_split_tile(y, b_ptr, out_ptr, part_ptr, count_ptr, m + tl.arange(0, 1), offs_n, M, N, SPLIT_K,
                     HAS_BIAS, SPLIT)
