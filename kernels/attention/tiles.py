"""The tile steps both attention kernels share: K/V tiles gathered through the block table, and one step of the
online softmax over a tile."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n, kv_head, kv_end,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """K and V [BLOCK_N, D_PAD] of cache positions n, gathered through the block table; MASKED: zeros (and no
    table read) where n >= kv_end."""
    d = tl.arange(0, D_PAD)
    if MASKED:
        in_range = n < kv_end
        page = tl.load(table + n // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        mask = in_range[:, None] & (d < HEAD_DIM)[None, :]
    else:
        page = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
        mask = (d < HEAD_DIM)[None, :]
    k_ptrs = k_cache_ptr + (page * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh)[:, None] + d[None, :]
    v_ptrs = v_cache_ptr + (page * stride_vb + (n % BLOCK_SIZE) * stride_vt + kv_head * stride_vh)[:, None] + d[None, :]
    if MASKED or HEAD_DIM != D_PAD:
        k = tl.load(k_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _softmax_step(acc, m, l, q, k, v, visible, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of queries q [M, D] over the tile k, v [N, D] (MASKED: only where visible [M, N]
    or [1, N]). qk_scale = scale * log2(e), so exp2 gives the softmax, applied in one FMA with the max
    subtraction. P is cast to V's dtype for the second tensor-core dot. Every row must see a key in its first
    tile (each kernel's tile order ensures it), so m is finite after it."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l
