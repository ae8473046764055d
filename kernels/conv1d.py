"""Causal depthwise conv1d + SiLU over the flat varlen batch, with per-sequence conv-state slots.

conv_states [num_slots, C, K-1] hold each sequence's last K-1 raw (pre-conv) inputs, oldest first.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl
from kernels.pdl import wait_for_predecessor


def causal_conv1d_varlen_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             conv_states: torch.Tensor, query_start_loc: torch.Tensor,
                             state_slots: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    """x [T, C] (sequences concatenated), weight [C, K]. Returns SiLU(conv(x) + bias) [T, C].

    Sequence b is prefixed by conv_states[slot] when has_initial_state[b] (zeros otherwise), and its
    last K-1 inputs (prefix included, for short chunks) are written back to conv_states[slot].
    """
    out = torch.empty_like(x)
    K = weight.shape[1]
    starts, slots, init = query_start_loc.tolist(), state_slots.tolist(), has_initial_state.tolist()
    for b, slot in enumerate(slots):
        if slot < 0:
            continue
        seq = x[starts[b]: starts[b + 1]].t().float()  # [C, L]
        prefix = conv_states[slot].float() if init[b] else seq.new_zeros(seq.shape[0], K - 1)
        full = torch.cat([prefix, seq], dim=1)
        y = F.conv1d(full[None], weight.float()[:, None, :], None if bias is None else bias.float(),
                     groups=seq.shape[0])[0]
        out[starts[b]: starts[b + 1]] = F.silu(y).t().to(x.dtype)
        conv_states[slot] = full[:, -(K - 1):].to(conv_states.dtype)
    return out


def causal_conv1d_update_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             conv_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """One new token per sequence: x [B, C]. Same as the varlen op with length-1 sequences and
    has_initial_state set; padded rows (slot < 0) are left untouched and return zeros."""
    out = torch.zeros_like(x)
    keep = state_slots >= 0
    slots = state_slots[keep].long()
    window = torch.cat([conv_states[slots].float(), x[keep].float()[:, :, None]], dim=2)  # [b, C, K]
    y = (window * weight.float()[None]).sum(-1)
    if bias is not None:
        y = y + bias.float()
    out[keep] = F.silu(y).to(x.dtype)
    conv_states[slots] = window[:, :, 1:].to(conv_states.dtype)
    return out


@triton.jit
def _seq_of_token(query_start_loc_ptr, t, num_seqs, SEARCH_STEPS: tl.constexpr):
    """Sequence index of flat token t: the last b < num_seqs with query_start_loc[b] <= t (binary search, so
    varlen grids need no host copy of query_start_loc; empty sequences are never chosen)."""
    lo = t * 0
    hi = lo + num_seqs - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(query_start_loc_ptr + mid) <= t
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _channels_if(c, C, cond):
    """Mask of channels c < C where the scalar cond holds, none elsewhere (a scalar folded into the bound,
    which keeps the mask uniform over 16-byte vectors)."""
    return c < tl.where(cond, C, 0)


@triton.jit
def _row_offsets(t, stride_t, c, stride_c, ROW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """Element offsets of channels c of row t. With ROW_ALIGN > 1 (the host proved unit channel stride and
    16-byte aligned rows) the hints let the access vectorise, which the compiler cannot see itself when the row
    stride is no multiple of 16 elements (a column slice of a wider row)."""
    offsets = t.to(tl.int64) * stride_t + c * stride_c
    if ROW_ALIGN > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, ROW_ALIGN), BLOCK_C)
    return offsets


@triton.jit
def _seq_input(x_ptr, states_ptr, s, start, slot, has_prefix, c, C,
               stride_xt, stride_xc, stride_ss, stride_sc, stride_sk,
               K: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 input u_s of the sequence that starts at token `start`: x row s from the start on, before it the
    conv state column K-1-(start-s) when has_prefix (initial state and a real slot), else zeros."""
    u = tl.load(x_ptr + _row_offsets(s, stride_xt, c, stride_xc, ROW_ALIGN, BLOCK_C),
                mask=_channels_if(c, C, s >= start), other=0.0)
    prefix = tl.load(states_ptr + slot.to(tl.int64) * stride_ss + c * stride_sc + (s - start + K - 1) * stride_sk,
                     mask=_channels_if(c, C, has_prefix & (s < start)), other=0.0)
    return u.to(tl.float32) + prefix.to(tl.float32)


@triton.jit
def _x_rows(x_ptr, r0, t_end, c, C, stride_xt, stride_xc,
            ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """x rows r0 .. r0+ROWS-1 (zeros from t_end on) as a tuple, all loads issued before any is used."""
    rows = ()
    for i in tl.static_range(ROWS):
        t = r0 + i
        rows = rows + (tl.load(x_ptr + _row_offsets(t, stride_xt, c, stride_xc, ROW_ALIGN, BLOCK_C),
                               mask=_channels_if(c, C, t < t_end), other=0.0),)
    return rows


@triton.jit
def _conv1d_varlen_kernel(x_ptr, w_ptr, bias_ptr, states_ptr, qsl_ptr, slots_ptr, init_ptr, out_ptr,
                          T, C, num_seqs, run_len,
                          stride_xt, stride_xc, stride_wc, stride_wk, stride_ss, stride_sc, stride_sk,
                          stride_ot, stride_oc,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """out[t, c] = SiLU(bias[c] + sum_d w[c, K-1-d] * u[t-d, c], d < K), u being the sequence's inputs
    prefixed by its conv state (or zeros), for BLOCK_C channels over the run of run_len flat tokens
    program_id(1). Runs ignore sequence boundaries so one long prompt fills the GPU. Each x row is loaded
    once: the last K-1 inputs ride along in registers (`window`), reset from the conv state at each sequence
    start, and the next ROWS rows are in flight while the current ones are computed. ROW_ALIGN (elements,
    proven on the host) says every row of x and out starts 16-byte aligned, so row loads and stores vectorise
    though the row stride of a column slice is no multiple of 16 elements. Reads conv_states only: the new
    states are written by _conv1d_state_kernel afterwards (another run may still read a sequence's old one)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    w = ()  # w[d] multiplies u[t-d]
    for d in tl.static_range(K):
        w = w + (tl.load(w_ptr + c * stride_wc + (K - 1 - d) * stride_wk, mask=c_ok, other=0.0).to(tl.float32),)
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)

    t0 = tl.program_id(1) * run_len
    t_end = tl.minimum(t0 + run_len, T)
    rows = _x_rows(x_ptr, t0, t_end, c, C, stride_xt, stride_xc, ROWS, ROW_ALIGN, BLOCK_C)  # in flight for the lookup
    seq = _seq_of_token(qsl_ptr, t0, num_seqs, SEARCH_STEPS)
    start = tl.load(qsl_ptr + seq)
    next_start = tl.load(qsl_ptr + seq + 1)
    slot = tl.load(slots_ptr + seq)
    has_prefix = (tl.load(init_ptr + seq) != 0) & (slot >= 0)
    window = ()  # window[d-1] = u[t-d] for the next token t
    for d in tl.static_range(1, K):
        window = window + (_seq_input(x_ptr, states_ptr, t0 - d, start, slot, has_prefix, c, C,
                                      stride_xt, stride_xc, stride_ss, stride_sc, stride_sk, K, ROW_ALIGN, BLOCK_C),)
    for r0 in range(t0, t_end, ROWS):
        next_rows = _x_rows(x_ptr, r0 + ROWS, t_end, c, C, stride_xt, stride_xc, ROWS, ROW_ALIGN, BLOCK_C)
        for i in tl.static_range(ROWS):
            t = r0 + i
            if (t >= next_start) & (t < t_end):  # first token of a new sequence (rare: a uniform branch)
                while (next_start <= t) & (seq < num_seqs - 1):  # skips empty sequences
                    seq += 1
                    next_start = tl.load(qsl_ptr + seq + 1)
                slot = tl.load(slots_ptr + seq)
                has_prefix = (tl.load(init_ptr + seq) != 0) & (slot >= 0)
                window = ()
                for d in tl.static_range(1, K):
                    window = window + (_seq_input(x_ptr, states_ptr, t - d, t, slot, has_prefix, c, C, stride_xt,
                                                  stride_xc, stride_ss, stride_sc, stride_sk, K, ROW_ALIGN, BLOCK_C),)
            u = rows[i].to(tl.float32)
            acc = bias + w[0] * u
            for d in tl.static_range(1, K):
                acc += w[d] * window[d - 1]
            y = acc / (1.0 + tl.exp2(acc * -1.4426950408889634))  # SiLU; 4 fewer instructions than acc * sigmoid
            tl.store(out_ptr + _row_offsets(t, stride_ot, c, stride_oc, ROW_ALIGN, BLOCK_C),
                     y.to(out_ptr.dtype.element_ty), mask=_channels_if(c, C, (t < t_end) & (slot >= 0)))
            shifted = (u,)
            for d in tl.static_range(K - 2):
                shifted = shifted + (window[d],)
            window = shifted
        rows = next_rows


@triton.jit
def _conv1d_state_kernel(x_ptr, states_ptr, qsl_ptr, slots_ptr, init_ptr, C,
                         stride_xt, stride_xc, stride_ss, stride_sc, stride_sk,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """conv_states[slot, c, j] = (prefix ++ x_seq)[L + j] for j < K-1: the last K-1 inputs of sequence
    program_id(0), old prefix included when L < K-1. One program owns whole state rows, and loads them
    before it stores, so reading the old state and writing the new one in place cannot race."""
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        return
    start = tl.load(qsl_ptr + b)
    length = tl.load(qsl_ptr + b + 1) - start
    prefix_len = (tl.load(init_ptr + b) != 0).to(tl.int32) * (K - 1)  # old state columns, 0 without one
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_K)
    pos = length + j  # index into prefix ++ x_seq
    ok = (c < C)[:, None] & (j < K - 1)[None, :]
    from_x = (pos >= K - 1)[None, :]
    from_state = (pos < prefix_len)[None, :]
    row = states_ptr + slot.to(tl.int64) * stride_ss + c[:, None] * stride_sc
    new = tl.load(x_ptr + (start + pos - (K - 1))[None, :] * stride_xt + c[:, None] * stride_xc,
                  mask=ok & from_x, other=0.0)
    new += tl.load(row + pos[None, :] * stride_sk, mask=ok & from_state, other=0.0).to(new.dtype)
    tl.store(row + j[None, :] * stride_sk, new.to(states_ptr.dtype.element_ty), mask=ok)


ROWS_IN_FLIGHT = 8  # x rows a program loads ahead of its compute (16 bytes each per thread)
PROGRAMS_PER_SM = 8  # one-warp programs: all resident at once (about 10 fit an SM at ~195 registers a thread)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 4 for the CPU interpreter, so small tests still split sequences across runs."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _row_align(x: torch.Tensor, out: torch.Tensor) -> int:
    """Elements per 16 bytes when every row of x and out starts 16-byte aligned with unit channel stride (the
    kernel then vectorises its row loads and stores), else 1."""
    vec = 16 // x.element_size()
    aligned = all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % vec == 0 for t in (x, out))
    return vec if aligned else 1


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_states: torch.Tensor, query_start_loc: torch.Tensor,
                         state_slots: torch.Tensor, has_initial_state: torch.Tensor,
                         run_len: int | None = None) -> torch.Tensor:
    """Triton version of causal_conv1d_varlen_ref (same arguments and result; no host sync); x may be a
    column slice of a wider row. run_len: flat tokens per program (a multiple of ROWS_IN_FLIGHT); None picks
    the shortest that keeps about PROGRAMS_PER_SM programs per SM, so each row is read about once."""
    T, C = x.shape
    K = weight.shape[1]
    B = state_slots.shape[0]
    assert K >= 2, "a width-1 conv has no state"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0 or B == 0:
        return out
    BLOCK_C = 32 * 16 // x.element_size()  # one warp, 16 bytes a thread a row
    channel_blocks = triton.cdiv(C, BLOCK_C)
    if run_len is None:
        runs = triton.cdiv(PROGRAMS_PER_SM * _sm_count(x.device), channel_blocks)
        run_len = triton.cdiv(triton.cdiv(T, runs), ROWS_IN_FLIGHT) * ROWS_IN_FLIGHT
    assert run_len > 0 and run_len % ROWS_IN_FLIGHT == 0
    _conv1d_varlen_kernel[(channel_blocks, triton.cdiv(T, run_len))](
        x, weight, bias, conv_states, query_start_loc, state_slots, has_initial_state, out,
        T, C, B, run_len, *x.stride(), *weight.stride(), *conv_states.stride(), *out.stride(),
        K=K, HAS_BIAS=bias is not None, SEARCH_STEPS=max(B - 1, 1).bit_length(), ROWS=ROWS_IN_FLIGHT,
        BLOCK_C=BLOCK_C, ROW_ALIGN=_row_align(x, out), num_warps=1)
    _conv1d_state_kernel[(B, triton.cdiv(C, 256))](
        x, conv_states, query_start_loc, state_slots, has_initial_state, C, *x.stride(), *conv_states.stride(),
        K=K, BLOCK_K=triton.next_power_of_2(K - 1), BLOCK_C=256, num_warps=4)
    return out


@triton.jit
def _conv1d_update_kernel(x_ptr, w_ptr, bias_ptr, states_ptr, slots_ptr, out_ptr, C,
                          stride_xb, stride_xc, stride_wc, stride_wk, stride_ss, stride_sc, stride_sk,
                          stride_ob, stride_oc,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """One decode token of sequence program_id(0) over BLOCK_C channels: the window is the K-1 state
    columns then x; the state shifts left by one in place (loaded in full before the store). The weights
    are loaded before waiting on the kernel that wrote x (kernels/pdl.py)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    j = tl.arange(0, BLOCK_K)
    ok = c_ok[:, None] & (j < K - 1)[None, :]
    w_old = tl.load(w_ptr + c[:, None] * stride_wc + j[None, :] * stride_wk, mask=ok, other=0.0).to(tl.float32)
    w_new = tl.load(w_ptr + c * stride_wc + (K - 1) * stride_wk, mask=c_ok, other=0.0).to(tl.float32)
    wait_for_predecessor(USE_PDL)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(out_ptr + b * stride_ob + c * stride_oc, tl.zeros((BLOCK_C,), out_ptr.dtype.element_ty), mask=c_ok)
        return
    row = states_ptr + slot.to(tl.int64) * stride_ss + c[:, None] * stride_sc
    old = tl.load(row + j[None, :] * stride_sk, mask=ok, other=0.0)
    shifted = tl.load(row + (j + 1)[None, :] * stride_sk, mask=ok & (j < K - 2)[None, :], other=0.0)
    xv = tl.load(x_ptr + b * stride_xb + c * stride_xc, mask=c_ok, other=0.0)
    acc = tl.sum(old.to(tl.float32) * w_old, axis=1) + xv.to(tl.float32) * w_new
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + c * stride_oc, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty),
             mask=c_ok)
    new = tl.where((j == K - 2)[None, :], xv.to(states_ptr.dtype.element_ty)[:, None], shifted)
    tl.store(row + j[None, :] * stride_sk, new, mask=ok)


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """Triton version of causal_conv1d_update_ref (same arguments and result; CUDA-graph capturable)."""
    Bt, C = x.shape
    K = weight.shape[1]
    out = torch.empty_like(x)
    if Bt == 0:
        return out
    BLOCK_C = 256 if Bt >= 16 else 64
    _conv1d_update_kernel[(Bt, triton.cdiv(C, BLOCK_C))](
        x, weight, bias, conv_states, state_slots, out, C, *x.stride(), *weight.stride(), *conv_states.stride(),
        *out.stride(), K=K, HAS_BIAS=bias is not None, BLOCK_K=triton.next_power_of_2(K - 1), BLOCK_C=BLOCK_C,
        num_warps=4, **pdl.launch_kwargs(x.device))
    return out
