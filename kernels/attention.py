"""Paged attention over a block-table KV cache: causal GQA attention for the flat batch, and the torch
reference of the K/V write (the Triton write is fused with RoPE in kernels/rope.py).

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]. Token j of a
sequence lives in block block_table[j // block_size] at offset j % block_size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.pdl import wait_for_predecessor
from kernels.split_k import MAX_TILES, last_to_arrive, tile_counters

try:  # host-side TMA descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] go to flat cache slot slot_mapping[t] = block * block_size + offset (< 0: skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, num_decodes: int = 0, max_query_len: int = 0, max_seq_len: int = 0, *,
                        new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] holds the new tokens of B sequences (rows query_start_loc[b]:query_start_loc[b+1]).

    Sequence b has seq_lens[b] tokens in the cache (its new ones already written); its i-th new query
    sits at position seq_lens[b] - n_new + i and attends causally to cache positions 0..that position.
    Query head h reads KV head h // (Hq / Hkv). Softmax in fp32. Returns o [T, Hq, D].
    num_decodes (the first sequences have one query each), max_query_len and max_seq_len (upper bounds)
    only let the kernel size its launch without reading the device; they do not change the result. Nor do
    new_k / new_v [T, Hkv, D]: the K / V rows of the new tokens, the same values as their cache slots, which
    the kernel may read densely instead of through the pages.
    """
    out = torch.empty_like(q)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        qs, qe = starts[b], starts[b + 1]
        if qe == qs:
            continue
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), k.float()) * scale
        q_pos = torch.arange(seq_len - (qe - qs), seq_len, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(seq_len, device=q.device)[None, :] > q_pos, float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634

# Decode: tokens per K/V tile, splits of the context sized so that about this many programs per SM run (an
# H100 sweep at 7B shapes, benchmarks/kernels_attention.py --sweep: 64 / 2 was best or within 3% everywhere).
DECODE_BLOCK_N = 64
DECODE_PROGRAMS_PER_SM = 2
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_SPLIT_CHUNK = 32  # partial results merged per step of the reduce pass
# The splits' partials merged by the last split of each (sequence, KV head) to finish, in the decode kernel: one
# launch, not two. That program reads active splits x GROUP x D x 4 bytes alone (7B: 3 KB a split), where the
# reduce kernel spreads the merge over a program per query head; False (benchmarks) runs the reduce kernel.
DECODE_MERGE_IN_KERNEL = True
# fp32 partial elements a merge step loads: 32 registers a thread at 4 warps (the 7B: 4 splits a step; 8 spilled
# 84 more bytes a thread than the kernel without the merge, sm_90 ptxas of Triton 3.9's PTX; 4 spill 8 more)
DECODE_MERGE_TILE = 4096


@triton.jit
def _attend_tile(acc, m, l, q, n0, k_cache_ptr, v_cache_ptr, table, kv_head, q_pos, kv_end, qk_scale,
                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of queries q [M, D_PAD] over keys n0 .. n0 + BLOCK_N, gathered through the
    block table. Scores are q.k * qk_scale (> 0; scale * log2(e), so exp2 gives the softmax), applied in one
    FMA with the max subtraction. MASKED: key n is visible to row r only if n <= q_pos[r] and n < kv_end;
    without it every key is visible and in range. P is cast to V's dtype for the second tensor-core dot."""
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    in_range = n < kv_end
    if MASKED:
        page = tl.load(table + n // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    else:
        page = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_cache_ptr + (page * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh)[:, None] + d[None, :]
    v_ptrs = v_cache_ptr + (page * stride_vb + (n % BLOCK_SIZE) * stride_vt + kv_head * stride_vh)[:, None] + d[None, :]
    if MASKED:
        kv_mask = in_range[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif HEAD_DIM == D_PAD:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        s = tl.where((n[None, :] <= q_pos[:, None]) & in_range[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def _merge_splits(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, first_head, n_active, num_splits, stride_oh,
                  GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  CHUNK: tl.constexpr):
    """_decode_reduce_kernel's merge for the GROUP query heads from first_head on, all in one program: their
    partials of splits 0 .. n_active, CHUNK splits at a time ([CHUNK, GROUP_P2, D_PAD] loads), written normalised
    to out_ptr's rows (out_ptr: the first head's; stride_oh apart). Read from L2 (.cg), where the other programs'
    stores are."""
    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, D_PAD)
    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, D_PAD], tl.float32)
    for s0 in range(0, n_active, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        mask = (s < n_active)[:, None] & (g < GROUP)[None, :]
        part = (first_head + g)[None, :] * num_splits + s[:, None]  # [CHUNK, GROUP_P2]
        m_s = tl.load(part_m_ptr + part, mask=mask, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_l_ptr + part, mask=mask, other=0.0, cache_modifier=".cg")
        acc_s = tl.load(part_acc_ptr + part[:, :, None] * D_PAD + d[None, None, :], mask=mask[:, :, None],
                        other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(m_s, 0))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # padding heads see no split: no inf - inf
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(m_s - m_ref[None, :])
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * acc_s, 0)
        l = l * alpha + tl.sum(w * l_s, 0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + g[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, count_ptr,
                   query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, qk_scale, partition_size, num_splits,
                   stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_bt,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, MERGE: tl.constexpr,
                   GROUP_P2: tl.constexpr, MERGE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """Program (sequence b, kv head, split): the GROUP query heads of b's single query over the split's slice
    of the context, [split * partition_size, +partition_size) clipped to seq_len.

    All query heads sharing a KV head go into one [GROUP_PAD, D] x [D, BLOCK_N] dot, so each K/V tile is read
    once. Without SPLIT the normalised output is written directly; with it, the unnormalised accumulator and its
    running max / sum go to scratch, merged (flash-decoding's second pass) by _decode_reduce_kernel or, MERGE,
    by the last split of (b, kv head) to finish (a counter per (b, kv head), kernels/split_k.py last_to_arrive):
    one launch. Split 0 always runs, so a sequence of length 0 gets zeros from it.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    wait_for_predecessor(USE_PDL)  # before the early return too: every program waits (kernels/pdl.py)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * partition_size
    if SPLIT:
        if start >= tl.maximum(seq_len, 1):
            return
    end = tl.minimum(start + partition_size, seq_len)
    row = tl.load(query_start_loc_ptr + b)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    d = tl.arange(0, D_PAD)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    q_pos = tl.full([GROUP_PAD], 0, tl.int32) + end - 1
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + b * stride_bt
    for n0 in range(start, end, BLOCK_N):
        acc, m, l = _attend_tile(acc, m, l, q, n0, k_cache_ptr, v_cache_ptr, table, kv_head, q_pos, end, qk_scale,
                                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                 D_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, PRECISION)

    if SPLIT:
        part = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_m_ptr + part, m, mask=g < GROUP)
        tl.store(part_l_ptr + part, l, mask=g < GROUP)
        tl.store(part_acc_ptr + part[:, None] * D_PAD + d[None, :], acc, mask=(g < GROUP)[:, None])
        if MERGE:
            n_active = tl.cdiv(tl.maximum(seq_len, 1), partition_size)
            if last_to_arrive(count_ptr, b * tl.num_programs(1) + kv_head, n_active):
                _merge_splits(part_acc_ptr, part_m_ptr, part_l_ptr,
                              out_ptr + row * stride_ot + kv_head * GROUP * stride_oh,
                              (b * tl.num_programs(1) + kv_head) * GROUP, n_active, num_splits, stride_oh, GROUP,
                              GROUP_P2, HEAD_DIM, D_PAD, MERGE_CHUNK)
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _decode_reduce_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
                          partition_size, num_splits, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """Program (sequence, query head): merges the partial softmax results of the splits that held tokens,
    SPLIT_CHUNK at a time. Sequences of length 0 get zeros."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    wait_for_predecessor(USE_PDL)
    seq_len = tl.load(seq_lens_ptr + b)
    n_active = tl.cdiv(seq_len, partition_size)
    base = (b * tl.num_programs(1) + h) * num_splits
    d = tl.arange(0, D_PAD)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, n_active, SPLIT_CHUNK):
        s = s0 + tl.arange(0, SPLIT_CHUNK)
        mask = s < n_active
        m_s = tl.load(part_m_ptr + base + s, mask=mask, other=float("-inf"))
        l_s = tl.load(part_l_ptr + base + s, mask=mask, other=0.0)
        acc_s = tl.load(part_acc_ptr + (base + s)[:, None] * D_PAD + d[None, :], mask=mask[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(m_s - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * acc_s, 0)
        l = l * alpha + tl.sum(w * l_s, 0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)
    row = tl.load(query_start_loc_ptr + b)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


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
def _softmax_step(acc, m, l, q, k, v, visible, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of queries q [M, D] over the tile k, v [N, D] (MASKED: only where visible [M, N]
    or [1, N]). qk_scale = scale * log2(e), so exp2 gives the softmax, applied in one FMA with the max
    subtraction. P is cast to V's dtype for the second tensor-core dot. Every row must see a key in its first
    tile (the kernel's tile order ensures it), so m is finite after it."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l


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


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in for the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _decode_partition(num_decodes: int, kv_heads: int, max_seq_len: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, partition_size): split the context so num_decodes * kv_heads * num_splits programs fill
    the GPU, but never below one K/V tile per split. Depends on host ints only (CUDA-graph safe)."""
    tiles = triton.cdiv(max(max_seq_len, 1), DECODE_BLOCK_N)
    wanted = triton.cdiv(DECODE_PROGRAMS_PER_SM * num_sms(device), num_decodes * kv_heads)
    splits = max(1, min(tiles, wanted))
    partition = triton.cdiv(tiles, splits) * DECODE_BLOCK_N
    return triton.cdiv(max(max_seq_len, 1), partition), partition


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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, num_decodes: int = 0, max_query_len: int = 0, max_seq_len: int = 0, *,
                    new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of paged_attention_ref: the first num_decodes sequences go to the (split) decode kernel,
    the rest to the varlen prefill kernel. With num_decodes > 0 and max_seq_len > 0 the decode launch reads
    nothing from the device (CUDA-graph capturable); missing hints are computed from the tensors. Given
    new_k / new_v (in the cache's dtype, last dim contiguous), the prefill reads the new tokens' K / V from
    them, the cached ones through the pages."""
    T, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // kv_heads
    q = _last_dim_contiguous(q)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * _LOG2E
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))

    if num_decodes > 0:
        if max_seq_len <= 0:
            max_seq_len = int(seq_lens[:num_decodes].max())
        num_splits, partition = _decode_partition(num_decodes, kv_heads, max_seq_len, q.device)
        split = num_splits > 1
        merge = split and DECODE_MERGE_IN_KERNEL
        part_shape = (num_decodes * num_heads * num_splits) if split else 1
        part_m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        part_l = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        part_acc = torch.empty(part_shape * d_pad, dtype=torch.float32, device=q.device)
        assert num_decodes * kv_heads <= MAX_TILES  # a merge counter per (sequence, KV head)
        group_p2 = triton.next_power_of_2(group)
        merge_chunk = min(triton.next_power_of_2(num_splits), max(1, DECODE_MERGE_TILE // (group_p2 * d_pad)))
        _decode_kernel[(num_decodes, kv_heads, num_splits)](
            q, k_cache, v_cache, out, part_acc, part_m, part_l, tile_counters(q.device), query_start_loc, seq_lens,
            block_tables, qk_scale, partition, num_splits, q.stride(0), q.stride(1), *cache_strides, out.stride(0),
            out.stride(1), block_tables.stride(0), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=DECODE_BLOCK_N, SPLIT=split, MERGE=merge,
            GROUP_P2=group_p2, MERGE_CHUNK=merge_chunk, PRECISION=precision, num_warps=DECODE_NUM_WARPS,
            num_stages=DECODE_NUM_STAGES, **pdl.launch_kwargs(q.device))
        if split and not merge:
            _decode_reduce_kernel[(num_decodes, num_heads)](
                part_acc, part_m, part_l, out, query_start_loc, seq_lens, partition, num_splits,
                out.stride(0), out.stride(1), HEAD_DIM=head_dim, D_PAD=d_pad, SPLIT_CHUNK=DECODE_SPLIT_CHUNK,
                num_warps=4, **pdl.launch_kwargs(q.device))

    num_prefills = num_seqs - num_decodes
    if num_prefills > 0:
        if max_query_len <= 0:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        cfg = dict(_prefill_config(q.dtype, max_query_len))
        use_descriptors = cfg.pop("DESCRIPTORS")
        new_kv = new_k is not None and new_k.dtype == new_v.dtype == k_cache.dtype
        if new_kv:
            new_k, new_v = _last_dim_contiguous(new_k), _last_dim_contiguous(new_v)
            new_strides = (new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1))
            descriptors = _new_kv_descriptors(new_k, new_v, cfg["BLOCK_N"]) if use_descriptors else None
            new_k_ptr, new_v_ptr = new_k, new_v  # pointer loads of the tile shared with cached keys
            if descriptors is not None:
                new_k, new_v = descriptors
        else:  # unread placeholders
            new_k, new_v, new_strides, descriptors = k_cache, v_cache, (0, 0, 0, 0), None
            new_k_ptr, new_v_ptr = k_cache, v_cache
        grid = (num_heads, num_prefills, triton.cdiv(max_query_len, cfg["BLOCK_M"]))
        _prefill_kernel[grid](
            q, k_cache, v_cache, new_k, new_v, new_k_ptr, new_v_ptr, out, query_start_loc, seq_lens, block_tables,
            qk_scale, num_decodes,
            q.stride(0), q.stride(1), *cache_strides, *new_strides, out.stride(0), out.stride(1),
            block_tables.stride(0), GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
            PRECISION=precision, NEW_KV=new_kv, DESCRIPTORS=descriptors is not None, **cfg)
    return out
