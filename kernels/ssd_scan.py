"""Mamba2 selective scan for prefill (SSD) over the flat varlen batch, state in per-sequence slots.

For each sequence, head h (group g = h // (H / G)), token t:
    dt_t = clamp(softplus(dt_raw_t + dt_bias), *dt_limit)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t        S: [P, N], fp32
    y_t  = S_t C_t + D * x_t
S_0 is ssm_states[slot] when has_initial_state, else zeros; the final S is written back to the slot.
The Triton kernel computes the same thing chunk by chunk (SSD); chunk_size changes only rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.attention import num_sms
from kernels.triton_math import softplus


def ssd_scan_varlen_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float],
                        ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                        has_initial_state: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """x [T, H, P], dt [T, H], A/D/dt_bias [H] fp32, B/C [T, G, N], ssm_states [slots, H, P, N] -> y [T, H, P]."""
    H, G = x.shape[1], B.shape[1]
    y = torch.empty_like(x)
    dt_all = F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit)
    Bh = B.float().repeat_interleave(H // G, dim=1)  # [T, H, N]
    Ch = C.float().repeat_interleave(H // G, dim=1)
    starts, slots, init = query_start_loc.tolist(), state_slots.tolist(), has_initial_state.tolist()
    for b, slot in enumerate(slots):
        if slot < 0:
            continue
        state = ssm_states[slot].float() if init[b] else x.new_zeros(ssm_states.shape[1:], dtype=torch.float32)
        for t in range(starts[b], starts[b + 1]):
            xt, dtt = x[t].float(), dt_all[t]
            state = torch.exp(dtt * A)[:, None, None] * state + (dtt[:, None] * xt)[:, :, None] * Bh[t][:, None, :]
            y[t] = (torch.einsum("hpn,hn->hp", state, Ch[t]) + D[:, None] * xt).to(x.dtype)
        ssm_states[slot] = state.to(ssm_states.dtype)
    return y


# The Triton path: the usual SSD decomposition in four launches. Chunks of chunk_size tokens restart at each
# sequence start; within chunk c of a sequence, with a_t = cumsum(dt * A) over the chunk's tokens up to t:
#   1. _ssd_dt_kernel:         dt_t (softplus, clamp), a_t and w_t = exp(a_end - a_t) dt_t     [H, T] fp32
#   2. _ssd_cb_kernel:         CB[t, s] = C_t . B_s                                             per chunk and group
#   3. _ssd_states_kernel:     per sequence, walking its chunks in order from the slot's state (or zeros):
#                              S_in(c) is stored for step 4, then S <- exp(a_end) S_in(c) + sum_s w_s x_s (outer)
#                              B_s; the last S goes back to the slot
#   4. _ssd_chunk_scan_kernel: y_t = exp(a_t) C_t S_in + sum_{s<=t} CB[t, s] exp(a_t - a_s) dt_s x_s + D x_t
# kernels/ssd_minimal.py writes the same steps as one page of einsums. Steps 2-4 are tl.dot matmuls with fp32
# accumulation. Step 3 keeps each chunk's own state in registers (mamba_ssm writes it out in fp32 and reads it
# back in a separate state-passing pass); S_in is stored in x's dtype, the precision step 4's dot reads it in.
# Step 1's programs find their chunk's sequence from query_start_loc and store the chunk's token range for steps
# 2 and 4 (the walk reads query_start_loc per sequence): no metadata launches, no host sync. Grids are sized by an
# upper bound on the number of chunks; extra programs return.


@triton.jit
def _seq_chunks(qsl_ptr, s, ok, CHUNK: tl.constexpr):
    """(first token, end token, chunks) of sequences s (where ok)."""
    lo = tl.load(qsl_ptr + s, mask=ok, other=0)
    hi = tl.load(qsl_ptr + s + 1, mask=ok, other=0)
    return lo, hi, (hi - lo + CHUNK - 1) // CHUNK


@triton.jit
def _chunk_bounds(i, qsl_ptr, slots_ptr, num_seqs, CHUNK: tl.constexpr, SEQ_BLOCK: tl.constexpr):
    """Chunk i of the flat batch: (live, its first token, its end token). Sequence b holds the chunks after
    those of sequences 0..b-1, counted SEQ_BLOCK sequences at a time (a fixed block: no recompile per batch
    size). live is false past the last chunk and for padded sequences (slot < 0)."""
    before = tl.zeros([], tl.int32)  # chunks of the sequences already counted
    start = tl.zeros([], tl.int32)
    seq_end = tl.zeros([], tl.int32)
    b = tl.zeros([], tl.int32) + num_seqs  # the sequence holding chunk i; num_seqs if none
    for s0 in range(0, num_seqs, SEQ_BLOCK):
        s = s0 + tl.arange(0, SEQ_BLOCK)
        lo, hi, n_chunks = _seq_chunks(qsl_ptr, s, s < num_seqs, CHUNK)
        first = before + tl.cumsum(n_chunks, 0) - n_chunks
        mine = (first <= i) & (i < first + n_chunks)
        start += tl.sum(tl.where(mine, lo + (i - first) * CHUNK, 0), 0)
        seq_end += tl.sum(tl.where(mine, hi, 0), 0)
        b = tl.minimum(b, tl.min(tl.where(mine, s, num_seqs), 0))
        before += tl.sum(n_chunks, 0)
    live = (b < num_seqs) & (tl.load(slots_ptr + tl.minimum(b, num_seqs - 1)) >= 0)
    return live, start, tl.minimum(start + CHUNK, seq_end)


@triton.jit
def _chunks_before(b, qsl_ptr, CHUNK: tl.constexpr, SEQ_BLOCK: tl.constexpr):
    """Chunks of sequences 0..b-1: the flat index of sequence b's first chunk."""
    total = tl.zeros([], tl.int32)
    for s0 in range(0, b, SEQ_BLOCK):
        s = s0 + tl.arange(0, SEQ_BLOCK)
        lo, hi, n_chunks = _seq_chunks(qsl_ptr, s, s < b, CHUNK)
        total += tl.sum(n_chunks, 0)
    return total


@triton.jit(do_not_specialize=["num_seqs"])
def _ssd_dt_kernel(dt_ptr, dt_bias_ptr, A_ptr, qsl_ptr, slots_ptr, dt_out_ptr, dA_ptr, w_ptr, bounds_ptr, T, H,
                   num_seqs, dt_min, dt_max, stride_dtt, stride_dth, CHUNK: tl.constexpr, SEQ_BLOCK: tl.constexpr,
                   CLAMP_DT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr):
    """dt_out[h, t] = clamp(softplus(dt + dt_bias)) and dA[h, t] = its running sum times A[h] within the chunk
    (a_t above), for chunk program_id(0) and BLOCK_H heads; [H, T] so later kernels read heads contiguously.
    w[h, t] = exp(a_end - a_t) dt: token t's weight in its chunk's state, made here where a_end is at hand, so
    each step of the sequential state walk loads it (one load) instead of deriving it (three, one scalar).
    bounds[chunk] = (first token, end token), (0, 0) for no chunk: the later kernels' programs read two ints
    instead of each searching query_start_loc."""
    live, start, end = _chunk_bounds(tl.program_id(0), qsl_ptr, slots_ptr, num_seqs, CHUNK, SEQ_BLOCK)
    if tl.program_id(1) == 0:
        tl.store(bounds_ptr + 2 * tl.program_id(0), tl.where(live, start, 0))
        tl.store(bounds_ptr + 2 * tl.program_id(0) + 1, tl.where(live, end, 0))
    if not live:
        return
    t = start + tl.arange(0, BLOCK_L)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (t < end)[:, None] & (h < H)[None, :]
    dt = tl.load(dt_ptr + t[:, None] * stride_dtt + h[None, :] * stride_dth, mask=ok, other=0.0).to(tl.float32)
    dt = softplus(dt + tl.load(dt_bias_ptr + h, mask=h < H, other=0.0).to(tl.float32)[None, :])
    if CLAMP_DT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(ok, dt, 0.0)
    dA = tl.cumsum(dt * tl.load(A_ptr + h, mask=h < H, other=0.0).to(tl.float32)[None, :], axis=0)
    out = h[None, :] * T + t[:, None]
    tl.store(dt_out_ptr + out, dt, mask=ok)
    tl.store(dA_ptr + out, dA, mask=ok)
    a_end = tl.sum(tl.where((t == end - 1)[:, None], dA, 0.0), axis=0)
    tl.store(w_ptr + out, tl.exp(a_end[None, :] - dA) * dt, mask=ok)


@triton.jit
def _ssd_cb_kernel(B_ptr, C_ptr, cb_ptr, bounds_ptr, N,
                   stride_Bt, stride_Bg, stride_Bn, stride_Ct, stride_Cg, stride_Cn,
                   stride_cbc, stride_cbg, stride_cbm, CHUNK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """cb[chunk, g, m-tile, k-tile] = C[m] . B[k] over N, once per group (heads of a group share it) and only
    for tiles on or below the diagonal, the ones the causal chunk scan uses (it reads whole rows of its tiles,
    unwritten entries included, and drops those above the diagonal)."""
    mb = tl.program_id(0) // tl.cdiv(CHUNK, BLOCK_K)
    kb = tl.program_id(0) % tl.cdiv(CHUNK, BLOCK_K)
    g = tl.program_id(1)
    i = tl.program_id(2)
    if kb * BLOCK_K >= (mb + 1) * BLOCK_M:
        return
    start = tl.load(bounds_ptr + 2 * i)
    end = tl.load(bounds_ptr + 2 * i + 1)
    if end == start:
        return
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        c = tl.load(C_ptr + (start + m)[:, None] * stride_Ct + g * stride_Cg + (n0 + n)[None, :] * stride_Cn,
                    mask=(start + m < end)[:, None] & (n0 + n < N)[None, :], other=0.0)
        bT = tl.load(B_ptr + (start + k)[None, :] * stride_Bt + g * stride_Bg + (n0 + n)[:, None] * stride_Bn,
                     mask=(start + k < end)[None, :] & (n0 + n < N)[:, None], other=0.0)
        acc += tl.dot(c, bT, input_precision=DOT_PRECISION)
    tl.store(cb_ptr + i.to(tl.int64) * stride_cbc + g * stride_cbg + m[:, None] * stride_cbm + k[None, :], acc,
             mask=(m < CHUNK)[:, None] & (k < CHUNK)[None, :])


@triton.jit(do_not_specialize=["num_seqs"])
def _ssd_states_kernel(x_ptr, B_ptr, w_ptr, dA_ptr, states_in_ptr, ssm_ptr, qsl_ptr, slots_ptr, init_ptr,
                       num_seqs, T, P, N, heads_per_group,
                       stride_xt, stride_xh, stride_xp, stride_Bt, stride_Bg, stride_Bn,
                       stride_sic, stride_sih, stride_sip, stride_ss, stride_sh, stride_sp, stride_sn,
                       CHUNK: tl.constexpr, SEQ_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (P, N) tile of head program_id(1)'s state for sequence program_id(2), walked through the sequence
    BLOCK_K tokens at a time. At a chunk's first block the state entering the chunk goes to states_in and is
    decayed to the chunk's end (exp(a_end) S); every block then adds x^T [P, K] @ (w_s B_s) [K, N] (w from
    _ssd_dt_kernel). The slot is read (initial state) before it is written (final state), by the same program."""
    pb = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    nb = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    h = tl.program_id(1)
    b = tl.program_id(2)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        return
    g = h // heads_per_group
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_ok = (p < P)[:, None] & (n < N)[None, :]
    s_ptrs = ssm_ptr + slot.to(tl.int64) * stride_ss + h * stride_sh + p[:, None] * stride_sp + n[None, :] * stride_sn
    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if tl.load(init_ptr + b) != 0:
        state = tl.load(s_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    in_ptrs = (states_in_ptr + _chunks_before(b, qsl_ptr, CHUNK, SEQ_BLOCK).to(tl.int64) * stride_sic
               + h * stride_sih + p[:, None] * stride_sip + n[None, :])
    seq_start = tl.load(qsl_ptr + b)
    seq_end = tl.load(qsl_ptr + b + 1)
    BLOCKS_PER_CHUNK: tl.constexpr = (CHUNK + BLOCK_K - 1) // BLOCK_K
    length = seq_end - seq_start
    n_blocks = (length // CHUNK) * BLOCKS_PER_CHUNK + tl.cdiv(length % CHUNK, BLOCK_K)
    # a_end of block j's chunk, loaded one block ahead: a load issued where it is used would put its latency
    # on the walk's serial path (the decay feeds the next dot) at every step
    a_end = tl.load(dA_ptr + h * T + tl.minimum(seq_start + CHUNK, seq_end) - 1, mask=length > 0, other=0.0)
    for j in range(0, n_blocks):
        c_start = seq_start + (j // BLOCKS_PER_CHUNK) * CHUNK
        c_end = tl.minimum(c_start + CHUNK, seq_end)
        a_end_next = tl.load(dA_ptr + h * T + tl.minimum(seq_start + ((j + 1) // BLOCKS_PER_CHUNK + 1) * CHUNK,
                                                         seq_end) - 1)
        first = j % BLOCKS_PER_CHUNK == 0
        chunk = tl.zeros([], tl.int64) + j // BLOCKS_PER_CHUNK
        tl.store(in_ptrs + chunk * stride_sic, state.to(states_in_ptr.dtype.element_ty), mask=tile_ok & first)
        state *= tl.where(first, tl.exp(a_end), 1.0)
        s = c_start + (j % BLOCKS_PER_CHUNK) * BLOCK_K + tl.arange(0, BLOCK_K)
        s_ok = s < c_end
        xT = tl.load(x_ptr + s[None, :] * stride_xt + h * stride_xh + p[:, None] * stride_xp,
                     mask=s_ok[None, :] & (p < P)[:, None], other=0.0)
        w = tl.load(w_ptr + h * T + s, mask=s_ok, other=0.0)
        Bs = tl.load(B_ptr + s[:, None] * stride_Bt + g * stride_Bg + n[None, :] * stride_Bn,
                     mask=s_ok[:, None] & (n < N)[None, :], other=0.0)
        state = tl.dot(xT, (Bs.to(tl.float32) * w[:, None]).to(xT.dtype), state, input_precision=DOT_PRECISION)
        a_end = a_end_next
    tl.store(s_ptrs, state.to(ssm_ptr.dtype.element_ty), mask=tile_ok)


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _ssd_chunk_scan_kernel(x_ptr, C_ptr, D_ptr, cb_ptr, dt_ptr, dA_ptr, states_in_ptr, y_ptr, bounds_ptr,
                           T, P, N, heads_per_group,
                           stride_xt, stride_xh, stride_xp, stride_Ct, stride_Cg, stride_Cn,
                           stride_cbc, stride_cbg, stride_cbm, stride_sic, stride_sih, stride_sip,
                           stride_yt, stride_yh, stride_yp,
                           CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """y[m-tile, h, p-tile] of chunk program_id(2): exp(a_m) C_m S_in (the state entering the chunk, K over N)
    plus the causal intra-chunk part (CB * decay * dt) @ x (K over the chunk's tokens up to the tile's last
    row), plus D x. fp32 accumulation; dot inputs in x's dtype (fp32 inputs: DOT_PRECISION). The tiles of one
    chunk and head are neighbours in the grid, so S_in and CB come from L2 after the first read."""
    mb = tl.program_id(0) // tl.cdiv(P, BLOCK_P)
    pb = tl.program_id(0) % tl.cdiv(P, BLOCK_P)
    h = tl.program_id(1)
    i = tl.program_id(2)
    start = tl.load(bounds_ptr + 2 * i)
    L = tl.load(bounds_ptr + 2 * i + 1) - start  # 0: no chunk
    if mb * BLOCK_M >= L:
        return
    g = h // heads_per_group
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < L
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    n = tl.arange(0, BLOCK_N)
    # a in log2 units: the exps below are exp2, one MUFU op each (tl.exp multiplies by log2(e) first)
    a_m = tl.load(dA_ptr + h * T + start + m, mask=m_ok, other=0.0) * LOG2E
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    si_base = states_in_ptr + i.to(tl.int64) * stride_sic + h * stride_sih
    for n0 in range(0, N, BLOCK_N):
        c = tl.load(C_ptr + (start + m)[:, None] * stride_Ct + g * stride_Cg + (n0 + n)[None, :] * stride_Cn,
                    mask=m_ok[:, None] & (n0 + n < N)[None, :], other=0.0)
        sT = tl.load(si_base + p[None, :] * stride_sip + (n0 + n)[:, None],
                     mask=p_ok[None, :] & (n0 + n < N)[:, None], other=0.0)
        acc += tl.dot(c, sT.to(c.dtype), input_precision=DOT_PRECISION)
    acc *= tl.exp2(a_m)[:, None]
    cb_base = cb_ptr + i.to(tl.int64) * stride_cbc + g * stride_cbg
    row_minus_col = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_K)[None, :]  # k <= m: one compare
    for k0 in range(0, tl.minimum((mb + 1) * BLOCK_M, L), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < L
        # Rows whole, so the copies are 16 bytes wide (a causal mask splits them into 4-byte ones); entries above
        # the diagonal may be unwritten (the CB kernel skips tiles above it) and fall to the select below.
        cb = tl.load(cb_base + m[:, None] * stride_cbm + k[None, :], mask=(m < CHUNK)[:, None] & (k < CHUNK)[None, :])
        a_k = tl.load(dA_ptr + h * T + start + k, mask=k_ok, other=0.0) * LOG2E
        dt_k = tl.load(dt_ptr + h * T + start + k, mask=k_ok, other=0.0)
        decay = tl.exp2(tl.minimum(a_m[:, None] - a_k[None, :], 0.0))  # min: entries above the diagonal stay finite
        w = tl.where(row_minus_col >= k0 - mb * BLOCK_M, cb * decay * dt_k[None, :], 0.0)
        xk = tl.load(x_ptr + (start + k)[:, None] * stride_xt + h * stride_xh + p[None, :] * stride_xp,
                     mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        acc += tl.dot(w.to(xk.dtype), xk, input_precision=DOT_PRECISION)
    xm = tl.load(x_ptr + (start + m)[:, None] * stride_xt + h * stride_xh + p[None, :] * stride_xp,
                 mask=m_ok[:, None] & p_ok[None, :], other=0.0)
    acc += tl.load(D_ptr + h).to(tl.float32) * xm.to(tl.float32)
    tl.store(y_ptr + (start + m)[:, None] * stride_yt + h * stride_yh + p[None, :] * stride_yp,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


@dataclass(frozen=True)
class SsdLaunch:
    """Tile sides (upper bounds, clipped to the shapes), warps and pipeline stages of the CB, state-walk and
    chunk-scan kernels. The state walk is sequential over a sequence's chunks, so a long sequence gives it few
    programs: its N tile halves (down to 32) until there are state_min_programs per SM (0: the tiles as given).
    The defaults are the settings measured before the per-shape table (H200, benchmarks/RESULTS.md): 128-token
    walk steps (64 were slower for long sequences, 256 for batches of short ones), the scan's 64 x 128 tiles."""
    scan_m: int = 64  # chunk rows
    scan_p: int = 128  # head dim
    scan_k: int = 32  # chunk tokens per step of the causal part
    scan_n: int = 64  # state columns per step of the C S_in part
    scan_warps: int = 4
    scan_stages: int = 2
    state_p: int = 64
    state_n: int = 64
    state_k: int = 128
    state_warps: int = 4
    state_stages: int = 2
    state_min_programs: int = 2
    cb_m: int = 64  # square CB tiles; the scan reads only entries on or below the diagonal, at any tiling
    cb_n: int = 64
    cb_warps: int = 4
    cb_stages: int = 3
    seq_block: int = 32  # sequences read at a time to find a chunk's sequence


# Per-shape settings for 16-bit inputs: (P, N, chunk, long sequences) -> SsdLaunch fields that differ from the
# defaults. Long: at least LONG_SEQUENCE tokens per sequence on average, where the walk has few programs.
# Filled from H200 sweeps (benchmarks/kernels_ssd_vs_mamba.py --sweep prints each candidate as such a dict);
# a shape missing here runs the defaults. Measured in the c2 sweep (benchmarks/RESULTS.md): three walk stages
# at P 64 / N 128 / chunk 128 for one 4,096-token sequence (81.3 vs 93.6 us), 128-wide walk P tiles at
# P 128 / N 256 / chunk 128 for 16 x 256 (213.0 vs 234.5 us). Session 9's sweep at P 128 / N 256 / chunk 256:
# 32-wide walk N tiles at 3 stages for long sequences, 128-wide walk P tiles for 16 x 256; after the chunk scan's
# whole-row CB loads (ssd2), 3 scan stages at P 64 and P 128 (whole call against mamba_ssm: 0.5B 4,096 1.17x,
# 16 x 256 1.40x; 7B 4,096 1.15x, 16 x 256 1.15x, 32,768 1.20x; 2 stages 1.05-1.36x). Session 10's sweep at the
# 34B shape (P 128 / N 256 / chunk 128): 3 scan stages, the walk without its minimum program count (4,096 tokens
# 1.43x mamba_ssm, 16 x 256 1.39x; the previous entries 1.31x at both).
LONG_SEQUENCE = 1024
TUNED: dict[tuple[int, int, int, bool], dict[str, int]] = {
    (64, 128, 128, True): dict(scan_stages=3, state_stages=3),
    (64, 128, 128, False): dict(scan_stages=3, state_min_programs=0),
    (128, 256, 256, True): dict(scan_stages=3, state_n=32, state_stages=3, state_min_programs=0),
    (128, 256, 256, False): dict(scan_stages=3, state_p=128, state_min_programs=0),
    (128, 256, 128, True): dict(scan_stages=3, state_min_programs=0),
    (128, 256, 128, False): dict(scan_stages=3, state_p=128, state_min_programs=0),
}


def ssd_launch(dtype: torch.dtype, P: int, N: int, chunk: int, num_tokens: int, num_seqs: int) -> SsdLaunch:
    """The launch for a call: TUNED's entry for the shape (16-bit inputs). fp32 inputs (dots as tf32x3) keep
    one setting for every batch, so a sequence's rounding (and greedy output) does not depend on what it is
    batched with: 8 warps, 64-token walk steps, three stages (the settings their GPU tests ran with before
    the table; untimed; fp32 tiles take twice the shared memory). The walk's N tile may still halve for few
    programs: N tiles split no sum, so no rounding changes."""
    if dtype == torch.float32:
        return SsdLaunch(scan_warps=8, state_warps=8, cb_warps=8, state_k=64, scan_stages=3, state_stages=3)
    long = num_tokens >= LONG_SEQUENCE * num_seqs
    return SsdLaunch(**TUNED.get((P, N, chunk, long), {}))


# Candidates for the sweep, as SsdLaunch fields; each is clipped to the shape (launch_candidates). The chunk
# scan's cover mamba_ssm's autotune list for its own chunk scan (rows, head-dim tile, token step; warps,
# stages; its C S_in step is the whole state up to 128 wide, else the token step: both are here) and the
# settings ours ran before. The walk's: P and N tiles (more programs for long sequences against wider dots;
# N 16: 192 programs for one sequence of 24 heads at P 64 / N 128), token steps, warps, stages, as exact tiles
# (no N halving).
_SCAN_TILES = [  # (m, p, k, n, warps, stages)
    (64, 128, 32, 64, 4, 2), (64, 128, 32, 64, 4, 3), (64, 128, 64, 64, 4, 3), (64, 128, 32, 128, 4, 2),
    (64, 128, 32, 64, 8, 3), (64, 64, 32, 64, 4, 3), (64, 64, 32, 32, 2, 4), (32, 128, 32, 64, 4, 3),
    (128, 128, 32, 64, 8, 2), (128, 128, 64, 64, 8, 3), (128, 64, 32, 64, 4, 3),
    *((m, p, k, n, w, st) for m, p, k, w, st in [  # mamba_ssm's list
        (128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 2, 5), (32, 64, 32, 2, 5),
        (64, 64, 32, 2, 4)] for n in (k, 128)),
]
SCAN_CANDIDATES = [dict(scan_m=m, scan_p=p, scan_k=k, scan_n=n, scan_warps=w, scan_stages=st)
                   for m, p, k, n, w, st in _SCAN_TILES]
WALK_CANDIDATES = [dict(state_p=p, state_n=n, state_k=k, state_warps=w, state_stages=st, state_min_programs=0)
                   for p, n, k, w, st in [  # (p, n, k, warps, stages)
                       (64, 32, 128, 4, 2), (64, 64, 128, 4, 2), (64, 32, 128, 4, 3), (64, 64, 128, 4, 3),
                       (128, 32, 128, 4, 2), (128, 64, 128, 4, 2), (128, 64, 128, 8, 2), (128, 32, 128, 4, 3),
                       (32, 32, 128, 4, 2), (32, 64, 128, 4, 3), (64, 32, 64, 4, 3), (64, 64, 256, 4, 2),
                       (64, 32, 256, 4, 2), (64, 128, 128, 8, 2), (128, 128, 64, 8, 3), (64, 16, 128, 4, 3),
                       (32, 32, 128, 4, 3)]]


def _dot_block(n: int, cap: int) -> int:
    """A tl.dot tile side for a dimension of size n: a power of two in [16, cap]."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _clipped(launch: SsdLaunch, P: int, N: int, chunk: int) -> SsdLaunch:
    """launch with no tile wider than its padded dimension."""
    return replace(launch, scan_m=_dot_block(chunk, launch.scan_m), scan_p=_dot_block(P, launch.scan_p),
                   scan_k=_dot_block(chunk, launch.scan_k), scan_n=_dot_block(N, launch.scan_n),
                   state_p=_dot_block(P, launch.state_p), state_n=_dot_block(N, launch.state_n),
                   state_k=_dot_block(chunk, launch.state_k), cb_m=_dot_block(chunk, launch.cb_m),
                   cb_n=_dot_block(N, launch.cb_n))


def launch_candidates(base: SsdLaunch, candidates: list[dict[str, int]], P: int, N: int,
                      chunk: int) -> list[SsdLaunch]:
    """base with each candidate's fields, clipped to the shape, duplicates dropped, in order."""
    return list(dict.fromkeys(_clipped(replace(base, **c), P, N, chunk) for c in candidates))


def ssd_scan_launches(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float],
                      ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                      has_initial_state: torch.Tensor, chunk_size: int = 256, launch: SsdLaunch | None = None,
                      ) -> tuple[torch.Tensor, dict[str, Callable[[], None]]]:
    """y (unwritten) and the four kernel launches that fill it, in order ("dt", "cb", "walk", "scan"), over
    scratch allocated here: S_in [chunks, H, P, N] in x's dtype, CB [chunks, G, chunk, chunk] fp32; chunks <=
    T/chunk + seqs. Separate so a benchmark can time one kernel; ssd_scan_varlen runs them all."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    num_seqs = state_slots.shape[0]
    dev = x.device
    CHUNK = chunk_size
    cfg = _clipped(launch or ssd_launch(x.dtype, P, N, CHUNK, T, num_seqs), P, N, CHUNK)
    max_chunks = min(T, T // CHUNK + num_seqs)  # each sequence adds at most one partial chunk
    seqs = (query_start_loc, state_slots)
    SEQ_BLOCK = cfg.seq_block
    dot_precision = "tf32x3" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: ~fp32-accurate dots
    y = torch.empty_like(x)
    dt_proc = torch.empty(H, T, dtype=torch.float32, device=dev)
    dA = torch.empty(H, T, dtype=torch.float32, device=dev)
    w_end = torch.empty(H, T, dtype=torch.float32, device=dev)
    bounds = torch.empty(max_chunks, 2, dtype=torch.int32, device=dev)
    cb = torch.empty(max_chunks, G, CHUNK, CHUNK, dtype=torch.float32, device=dev)
    states_in = torch.empty(max_chunks, H, P, N, dtype=x.dtype, device=dev)
    BLOCK_H = 8

    def dt_cumsum():
        _ssd_dt_kernel[(max_chunks, triton.cdiv(H, BLOCK_H))](
            dt, dt_bias, A, *seqs, dt_proc, dA, w_end, bounds, T, H, num_seqs, float(dt_limit[0]), float(dt_limit[1]),
            *dt.stride(), CHUNK=CHUNK, SEQ_BLOCK=SEQ_BLOCK, CLAMP_DT=tuple(dt_limit) != (0.0, math.inf),
            BLOCK_L=triton.next_power_of_2(CHUNK), BLOCK_H=BLOCK_H, num_warps=4)

    def chunk_cb():
        _ssd_cb_kernel[(triton.cdiv(CHUNK, cfg.cb_m) ** 2, G, max_chunks)](
            B, C, cb, bounds, N, *B.stride(), *C.stride(), *cb.stride()[:3], CHUNK=CHUNK, BLOCK_M=cfg.cb_m,
            BLOCK_K=cfg.cb_m, BLOCK_N=cfg.cb_n, DOT_PRECISION=dot_precision, num_warps=cfg.cb_warps,
            num_stages=cfg.cb_stages)

    state_n = cfg.state_n
    while state_n > 32 and (num_seqs * H * triton.cdiv(P, cfg.state_p) * triton.cdiv(N, state_n)
                            < cfg.state_min_programs * num_sms(dev)):
        state_n //= 2

    def walk():
        _ssd_states_kernel[(triton.cdiv(P, cfg.state_p) * triton.cdiv(N, state_n), H, num_seqs)](
            x, B, w_end, dA, states_in, ssm_states, *seqs, has_initial_state, num_seqs, T, P, N, H // G,
            *x.stride(), *B.stride(), *states_in.stride()[:3], *ssm_states.stride(),
            CHUNK=CHUNK, SEQ_BLOCK=SEQ_BLOCK, BLOCK_P=cfg.state_p, BLOCK_N=state_n, BLOCK_K=cfg.state_k,
            DOT_PRECISION=dot_precision, num_warps=cfg.state_warps, num_stages=cfg.state_stages)

    def scan():  # a chunk's row tiles adjacent in the grid, so they share S_in and CB through L2
        _ssd_chunk_scan_kernel[(triton.cdiv(CHUNK, cfg.scan_m) * triton.cdiv(P, cfg.scan_p), H, max_chunks)](
            x, C, D, cb, dt_proc, dA, states_in, y, bounds, T, P, N, H // G, *x.stride(), *C.stride(),
            *cb.stride()[:3], *states_in.stride()[:3], *y.stride(), CHUNK=CHUNK, BLOCK_M=cfg.scan_m,
            BLOCK_P=cfg.scan_p, BLOCK_K=cfg.scan_k, BLOCK_N=cfg.scan_n, DOT_PRECISION=dot_precision,
            num_warps=cfg.scan_warps, num_stages=cfg.scan_stages)

    return y, dict(dt=dt_cumsum, cb=chunk_cb, walk=walk, scan=scan)


def ssd_scan_varlen(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float],
                    ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                    has_initial_state: torch.Tensor, chunk_size: int = 256,
                    launch: SsdLaunch | None = None) -> torch.Tensor:
    """Triton version of ssd_scan_varlen_ref (same arguments and result; no host sync, CUDA-graph capturable).
    launch: None for ssd_launch's choice for the shape."""
    if x.shape[0] == 0 or state_slots.shape[0] == 0:
        return torch.empty_like(x)
    y, launches = ssd_scan_launches(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_states, query_start_loc, state_slots,
                                    has_initial_state, chunk_size, launch)
    for run in launches.values():
        run()
    return y
