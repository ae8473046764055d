"""Causal depthwise conv1d + SiLU over the flat varlen batch, with per-sequence conv-state slots.

conv_states [num_slots, C, K-1] hold each sequence's last K-1 raw (pre-conv) inputs, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


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
def _seq_of_tokens(query_start_loc_ptr, t, num_seqs, SEARCH_STEPS: tl.constexpr):
    """Sequence index of each flat token t: the last b < num_seqs with query_start_loc[b] <= t (binary
    search, so varlen grids need no host copy of query_start_loc; empty sequences are never chosen)."""
    lo = tl.zeros_like(t)
    hi = lo + num_seqs - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(query_start_loc_ptr + mid) <= t
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _conv1d_varlen_kernel(x_ptr, w_ptr, bias_ptr, states_ptr, qsl_ptr, slots_ptr, init_ptr, out_ptr,
                          T, C, num_seqs,
                          stride_xt, stride_xc, stride_wc, stride_wk, stride_ss, stride_sc, stride_sk,
                          stride_ot, stride_oc,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t, c] = SiLU(bias[c] + sum_k w[c, k] * u[t - (K-1) + k, c]) over a [BLOCK_T, BLOCK_C] tile of the
    flat batch, u being the sequence's inputs prefixed by its conv state (or zeros). Tokens are tiled over
    the flat batch (not per sequence) so a single long prompt fills the GPU; the K shifted loads of x hit L1.
    Reads conv_states only: the new states are written by _conv1d_state_kernel afterwards (no race)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < T
    c_ok = c < C
    seq = _seq_of_tokens(qsl_ptr, t, num_seqs, SEARCH_STEPS)
    start = tl.load(qsl_ptr + seq, mask=t_ok, other=0)
    slot = tl.load(slots_ptr + seq, mask=t_ok, other=-1)
    init = tl.load(init_ptr + seq, mask=t_ok, other=0) != 0
    live = t_ok & (slot >= 0)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        in_seq = src >= start
        u = tl.load(x_ptr + src[:, None] * stride_xt + c[None, :] * stride_xc,
                    mask=(live & in_seq)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        u += tl.load(states_ptr + slot[:, None] * stride_ss + c[None, :] * stride_sc
                     + (src - start + K - 1)[:, None] * stride_sk,
                     mask=(live & init & (src < start))[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c * stride_wc + k * stride_wk, mask=c_ok, other=0.0).to(tl.float32)
        acc += u * w[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + t[:, None] * stride_ot + c[None, :] * stride_oc, out.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & c_ok[None, :])


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


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_states: torch.Tensor, query_start_loc: torch.Tensor,
                         state_slots: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    """Triton version of causal_conv1d_varlen_ref (same arguments and result; no host sync)."""
    T, C = x.shape
    K = weight.shape[1]
    B = state_slots.shape[0]
    out = torch.empty_like(x)
    if T == 0 or B == 0:
        return out
    BLOCK_T, BLOCK_C = 16, 64
    _conv1d_varlen_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C))](
        x, weight, bias, conv_states, query_start_loc, state_slots, has_initial_state, out,
        T, C, B, *x.stride(), *weight.stride(), *conv_states.stride(), *out.stride(),
        K=K, HAS_BIAS=bias is not None, SEARCH_STEPS=max(B - 1, 1).bit_length(), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        num_warps=4)
    _conv1d_state_kernel[(B, triton.cdiv(C, 256))](
        x, conv_states, query_start_loc, state_slots, has_initial_state, C, *x.stride(), *conv_states.stride(),
        K=K, BLOCK_K=triton.next_power_of_2(K - 1), BLOCK_C=256, num_warps=4)
    return out


@triton.jit
def _conv1d_update_kernel(x_ptr, w_ptr, bias_ptr, states_ptr, slots_ptr, out_ptr, C,
                          stride_xb, stride_xc, stride_wc, stride_wk, stride_ss, stride_sc, stride_sk,
                          stride_ob, stride_oc,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """One decode token of sequence program_id(0) over BLOCK_C channels: the window is the K-1 state
    columns then x; the state shifts left by one in place (loaded in full before the store)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(out_ptr + b * stride_ob + c * stride_oc, tl.zeros((BLOCK_C,), out_ptr.dtype.element_ty), mask=c_ok)
        return
    j = tl.arange(0, BLOCK_K)
    ok = c_ok[:, None] & (j < K - 1)[None, :]
    row = states_ptr + slot.to(tl.int64) * stride_ss + c[:, None] * stride_sc
    old = tl.load(row + j[None, :] * stride_sk, mask=ok, other=0.0)
    shifted = tl.load(row + (j + 1)[None, :] * stride_sk, mask=ok & (j < K - 2)[None, :], other=0.0)
    xv = tl.load(x_ptr + b * stride_xb + c * stride_xc, mask=c_ok, other=0.0)
    w_old = tl.load(w_ptr + c[:, None] * stride_wc + j[None, :] * stride_wk, mask=ok, other=0.0).to(tl.float32)
    w_new = tl.load(w_ptr + c * stride_wc + (K - 1) * stride_wk, mask=c_ok, other=0.0).to(tl.float32)
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
        num_warps=4)
    return out
