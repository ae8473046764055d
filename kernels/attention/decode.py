"""Decode attention: one query per sequence, the query heads of a KV head in one program, the context split
across programs (flash-decoding) when the sequences alone are too few to fill the GPU; the splits' partials
merged by a reduce kernel, a program per query head. Reference: reference.py paged_attention_ref.

The launch has a split count sized for the longest context it may see (a CUDA graph's max_model_len); each
sequence splits its own context over those splits, at least DECODE_MIN_PARTITION tokens a split, so a short
context runs in one program that writes its output directly, with no partials to merge.

The tunables below are read at launch (kernels/attention/__init__.py): tests and benchmarks set them here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.attention.tiles import _load_paged_kv, _softmax_step
from kernels.pdl import wait_for_predecessor

# Decode: tokens per K/V tile, splits of the context sized so that about this many programs per SM run (an
# H100 sweep at 7B shapes, benchmarks/kernels_attention.py --sweep: 64 / 2 was best or within 3% everywhere).
DECODE_BLOCK_N = 64
DECODE_PROGRAMS_PER_SM = 2
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_SPLIT_CHUNK = 32  # partial results merged per step of the reduce pass
# Tokens a split holds at least (rounded up to DECODE_BLOCK_N): below it a split's partial store and the
# reduce's loads cost more than the tiles they spread (H200, benchmarks/decode_tail.py --cases attention, RESULTS.md
# session 16: a 160-token context in one program 6.4 us a layer, in 3 splits of 64 7.8; other values for the
# reduce path not swept yet).
DECODE_MIN_PARTITION = 256


@triton.jit
def _sequence_splits(seq_len, num_splits, MIN_PARTITION: tl.constexpr, BLOCK_N: tl.constexpr):
    """(partition, active splits) of this sequence: its context over at most num_splits splits of `partition`
    tokens, a multiple of BLOCK_N and at least MIN_PARTITION (itself a multiple of BLOCK_N). Split s covers
    [s * partition, +partition); a sequence of length 0 has one split."""
    per_split = tl.cdiv(tl.maximum(seq_len, 1), num_splits)
    partition = tl.maximum(tl.cdiv(per_split, BLOCK_N) * BLOCK_N, MIN_PARTITION)
    return partition, tl.cdiv(tl.maximum(seq_len, 1), partition)


@triton.jit
def _attend_tile(acc, m, l, q, n0, k_cache_ptr, v_cache_ptr, table, kv_head, q_pos, kv_end, qk_scale,
                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of queries q [M, D_PAD] over keys n0 .. n0 + BLOCK_N, gathered through the
    block table. MASKED: key n is visible to row r only if n <= q_pos[r] and n < kv_end; without it every key
    is visible and in range."""
    n = n0 + tl.arange(0, BLOCK_N)
    k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n, kv_head, kv_end,
                          stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                          HEAD_DIM, D_PAD, BLOCK_SIZE, MASKED)
    visible = (n[None, :] <= q_pos[:, None]) & (n < kv_end)[None, :]
    return _softmax_step(acc, m, l, q, k, v, visible, qk_scale, MASKED, PRECISION)


@triton.jit
def _store_normalised(acc, l, out_ptr, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """acc [GROUP_PAD, D_PAD] / l to the GROUP query heads' rows from out_ptr on (stride_oh apart)."""
    g = tl.arange(0, acc.shape[0])
    d = tl.arange(0, acc.shape[1])
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + g[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
                   query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, qk_scale, num_splits,
                   stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_bt,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr,
                   SPLIT: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (sequence b, kv head, split): the GROUP query heads of b's single query over the split's slice
    of the context (_sequence_splits), clipped to seq_len.

    All query heads sharing a KV head go into one [GROUP_PAD, D] x [D, BLOCK_N] dot, so each K/V tile is read
    once. The normalised output is written directly when the context fits one split; else (SPLIT) the
    unnormalised accumulator and its running max / sum go to scratch, merged (flash-decoding's second pass) by
    _decode_reduce_kernel. Split 0 always runs, so a sequence of length 0 gets zeros from it.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    wait_for_predecessor(USE_PDL)  # before the early return too: every program waits (kernels/pdl.py)
    seq_len = tl.load(seq_lens_ptr + b)
    partition, n_active = _sequence_splits(seq_len, num_splits, MIN_PARTITION, BLOCK_N)
    start = split * partition
    if SPLIT:
        if split >= n_active:
            return
    end = tl.minimum(start + partition, seq_len)
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

    out_rows = out_ptr + row * stride_ot + kv_head * GROUP * stride_oh
    if SPLIT:  # constexpr first: a launch of one split compiles no partial stores (its n_active is always 1)
        if n_active > 1:
            part = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
            tl.store(part_m_ptr + part, m, mask=g < GROUP)
            tl.store(part_l_ptr + part, l, mask=g < GROUP)
            tl.store(part_acc_ptr + part[:, None] * D_PAD + d[None, :], acc, mask=(g < GROUP)[:, None])
        else:
            _store_normalised(acc, l, out_rows, stride_oh, GROUP, HEAD_DIM)
    else:
        _store_normalised(acc, l, out_rows, stride_oh, GROUP, HEAD_DIM)


@triton.jit
def _decode_reduce_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
                          num_splits, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          MIN_PARTITION: tl.constexpr, SPLIT_CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (sequence, query head): merges the partial softmax results of the splits that held tokens,
    SPLIT_CHUNK at a time. A sequence of one split (length 0 included) has its output from the decode kernel."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    wait_for_predecessor(USE_PDL)
    seq_len = tl.load(seq_lens_ptr + b)
    _, n_active = _sequence_splits(seq_len, num_splits, MIN_PARTITION, BLOCK_N)
    if n_active == 1:
        return
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


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in for the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def min_partition() -> int:
    """DECODE_MIN_PARTITION rounded up to whole K/V tiles."""
    return triton.cdiv(max(DECODE_MIN_PARTITION, 1), DECODE_BLOCK_N) * DECODE_BLOCK_N


def decode_splits(num_decodes: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits of the launch: enough that num_decodes * kv_heads * splits programs fill the GPU, no more than a
    max_seq_len context fills at min_partition() tokens a split. Host ints only (CUDA-graph safe)."""
    wanted = triton.cdiv(DECODE_PROGRAMS_PER_SM * num_sms(device), num_decodes * kv_heads)
    return max(1, min(triton.cdiv(max(max_seq_len, 1), min_partition()), wanted))
