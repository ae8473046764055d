"""Decode attention: one query per sequence, the query heads of a KV head in one program, the context split
across programs (flash-decoding) when the sequences alone are too few to fill the GPU; the splits' partials
merged by the last split to finish or by a reduce kernel. Reference: reference.py paged_attention_ref.

The tunables below are read at launch (kernels/attention/__init__.py): tests and benchmarks set them here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.attention.tiles import _load_paged_kv, _softmax_step
from kernels.pdl import wait_for_predecessor
from kernels.split_k import last_to_arrive

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
    block table. MASKED: key n is visible to row r only if n <= q_pos[r] and n < kv_end; without it every key
    is visible and in range."""
    n = n0 + tl.arange(0, BLOCK_N)
    k, v = _load_paged_kv(k_cache_ptr, v_cache_ptr, table, n, kv_head, kv_end,
                          stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                          HEAD_DIM, D_PAD, BLOCK_SIZE, MASKED)
    visible = (n[None, :] <= q_pos[:, None]) & (n < kv_end)[None, :]
    return _softmax_step(acc, m, l, q, k, v, visible, qk_scale, MASKED, PRECISION)


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
