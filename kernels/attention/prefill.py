"""Prefill attention: the varlen causal kernel over a chunk's cached keys (through the pages) and new ones
(densely, through TMA descriptors where it can), its tile configs. Reference: reference.py paged_attention_ref.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from kernels.attention.tiles import _load_paged_kv, _softmax_step


@triton.jit
def _load_new_kv(new_k, new_v, q_start, j0, kv_head, n_new, stride_nkt, stride_nkh, stride_nvt, stride_nvh,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DESCRIPTORS: tl.constexpr,
                 MASKED: tl.constexpr):
    """K and V [BLOCK_N, D_PAD] of the chunk's new tokens j0 .. j0 + BLOCK_N, read densely from rows q_start + j of
    new_k / new_v [T, Hkv, D]: tensor descriptors (TMA: whole tiles, rows past T zero-filled) or pointers.
    MASKED: pointer loads give zeros where j < 0 or j >= n_new (the tile shared with cached keys; the diagonal
    tiles, which may run past the sequence)."""
    if DESCRIPTORS:
        k = new_k.load([q_start + j0, kv_head * HEAD_DIM])
        v = new_v.load([q_start + j0, kv_head * HEAD_DIM])
    else:
        j = j0 + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D_PAD)
        rows = (q_start + j)[:, None]
        k_ptrs = new_k + rows * stride_nkt + kv_head * stride_nkh + d[None, :]
        v_ptrs = new_v + rows * stride_nvt + kv_head * stride_nvh + d[None, :]
        if MASKED:
            mask = ((j >= 0) & (j < n_new))[:, None] & (d < HEAD_DIM)[None, :]
        else:
            mask = (d < HEAD_DIM)[None, :]
        if MASKED or HEAD_DIM != D_PAD:
            k = tl.load(k_ptrs, mask=mask, other=0.0)
            v = tl.load(v_ptrs, mask=mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, new_k, new_v, new_k_ptr, new_v_ptr, out_ptr, query_start_loc_ptr,
                    seq_lens_ptr, block_tables_ptr, qk_scale, num_decodes,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_nkt, stride_nkh, stride_nvt, stride_nvh, stride_ot, stride_oh, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    NEW_KV: tl.constexpr, DESCRIPTORS: tl.constexpr):
    """Program (query head, prefill sequence, query block): BLOCK_M new queries of one head against the
    sequence's cached + new keys, with an fp32 online softmax.

    Query i of the chunk sits at position ctx + i (ctx = seq_len - n_new tokens were cached before). Key tiles
    are aligned to positions: those wholly below the block's first position unmasked, the rest up to its last
    one masked. NEW_KV: cached keys come through the block table, the chunk's own keys densely from new_k /
    new_v (DESCRIPTORS: TMA tiles), the tile holding both from both; without NEW_KV every key comes through
    the block table.
    The grid runs heads fastest and query blocks slowest, last-first: the programs of the last blocks, whose
    causal work is the largest, start first across all heads and sequences (before, only within one head), and
    the GROUP heads of one KV head run side by side, sharing its K/V tiles in L2.
    """
    head = tl.program_id(0)
    b = num_decodes + tl.program_id(1)
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    n_new = tl.load(query_start_loc_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= n_new:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - n_new
    kv_head = head // GROUP

    i = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = i < n_new
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + b * stride_bt
    # Key tiles sit at fixed positions (0, BLOCK_N, ...) whatever ctx is, so a query's keys are grouped, and its
    # softmax rounded, the same whether a prefix cache served part of the prompt or not.
    q_pos = ctx + i
    first_pos = ctx + m_block * BLOCK_M
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N  # tiles below it are visible to every row of the block
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
    if NEW_KV:
        cached_end = (ctx // BLOCK_N) * BLOCK_N  # tiles wholly cached; all below unmasked_end
        new_begin = tl.cdiv(ctx, BLOCK_N) * BLOCK_N  # tiles wholly new
        for n0 in range(0, cached_end, BLOCK_N):
            k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n0 + tl.arange(0, BLOCK_N), kv_head, ctx,
                                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                  HEAD_DIM, D_PAD, BLOCK_SIZE, False)
            acc, m, l = _softmax_step(acc, m, l, q, k, v, None, qk_scale, False, PRECISION)
        if cached_end < ctx:  # the tile of the first new key: its cached keys through the pages, new ones dense
            n = cached_end + tl.arange(0, BLOCK_N)
            k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n, kv_head, ctx,
                                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                  HEAD_DIM, D_PAD, BLOCK_SIZE, True)
            k_new, v_new = _load_new_kv(new_k_ptr, new_v_ptr, q_start, cached_end - ctx, kv_head, n_new, stride_nkt,
                                        stride_nkh, stride_nvt, stride_nvh, HEAD_DIM, D_PAD, BLOCK_N, False, True)
            k, v = k + k_new, v + v_new  # each zero where the other holds the key: exact
            visible = (n[None, :] <= q_pos[:, None]) & (n < kv_end)[None, :]
            acc, m, l = _softmax_step(acc, m, l, q, k, v, visible, qk_scale, True, PRECISION)
        for n0 in range(new_begin, unmasked_end, BLOCK_N):
            k, v = _load_new_kv(new_k, new_v, q_start, n0 - ctx, kv_head, n_new, stride_nkt, stride_nkh,
                                stride_nvt, stride_nvh, HEAD_DIM, D_PAD, BLOCK_N, DESCRIPTORS, False)
            acc, m, l = _softmax_step(acc, m, l, q, k, v, None, qk_scale, False, PRECISION)
        for n0 in range(tl.maximum(new_begin, unmasked_end), kv_end, BLOCK_N):
            k, v = _load_new_kv(new_k, new_v, q_start, n0 - ctx, kv_head, n_new, stride_nkt, stride_nkh,
                                stride_nvt, stride_nvh, HEAD_DIM, D_PAD, BLOCK_N, DESCRIPTORS, True)
            n = n0 + tl.arange(0, BLOCK_N)
            visible = (n[None, :] <= q_pos[:, None]) & (n < kv_end)[None, :]
            acc, m, l = _softmax_step(acc, m, l, q, k, v, visible, qk_scale, True, PRECISION)
    else:
        for n0 in range(0, unmasked_end, BLOCK_N):
            k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n0 + tl.arange(0, BLOCK_N), kv_head, kv_end,
                                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                  HEAD_DIM, D_PAD, BLOCK_SIZE, False)
            acc, m, l = _softmax_step(acc, m, l, q, k, v, None, qk_scale, False, PRECISION)
        for n0 in range(unmasked_end, kv_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n, kv_head, kv_end,
                                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                  HEAD_DIM, D_PAD, BLOCK_SIZE, True)
            visible = (n[None, :] <= q_pos[:, None]) & (n < kv_end)[None, :]
            acc, m, l = _softmax_step(acc, m, l, q, k, v, visible, qk_scale, True, PRECISION)

    out = acc / l[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])



PREFILL_SHORT_QUERY_LEN = 512  # chunks up to this long take the short-chunk tiles of _prefill_config


def _prefill_config(dtype: torch.dtype, max_query_len: int) -> dict:
    """Tile settings of the prefill kernel. BLOCK_N, the key tile, is the same for every chunk length of a dtype:
    it fixes how a query's keys are grouped and so how its softmax rounds, and a query must come out the same
    whether its chunk is long (no prefix cache, or long companions in the batch) or short. BLOCK_M may vary.
    DESCRIPTORS: the new keys through TMA descriptors where possible (_new_kv_descriptors), else pointers.
    Long chunks: 128-row blocks over two warpgroups (each wgmma 64 rows; one group's softmax runs under the
    other's dots); short chunks: 64-row blocks, several CTAs per SM, for programs enough to fill the GPU. 3
    stages: faster than 2 in benchmarks/kernels_attention.py --sweep on the H200 (session 10 X1), whose fastest
    tiles (128 x 128 long, 64 x 32 short) differ in BLOCK_N; 128 x 64 and 64 x 64 are not yet timed. fp32 dots
    run on FMA units: small tiles, no pipelining."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, DESCRIPTORS=False)
    if max_query_len <= PREFILL_SHORT_QUERY_LEN:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, DESCRIPTORS=True)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, DESCRIPTORS=True)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Whether kernels on device can take host TMA descriptors: triton >= 3.4 and sm_90+ (or the interpreter)."""
    if TensorDescriptor is None:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _new_kv_descriptors(new_k: torch.Tensor, new_v: torch.Tensor, block_n: int) -> tuple | None:
    """TMA descriptors of [block_n, D] tiles over new_k / new_v [T, Hkv, D] seen as [T, Hkv * D] (rows past T
    read as zeros), or None where TMA cannot read them (16-byte aligned base and row stride, heads adjacent,
    D a power of two)."""
    T, kv_heads, head_dim = new_k.shape
    if not _has_tma(new_k.device) or head_dim != triton.next_power_of_2(head_dim) or head_dim < 16:
        return None
    descriptors = []
    for x in (new_k, new_v):
        if x.stride(1) != head_dim or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
            return None
        descriptors.append(TensorDescriptor(x, [T, kv_heads * head_dim], [x.stride(0), 1], [block_n, head_dim]))
    return tuple(descriptors)

