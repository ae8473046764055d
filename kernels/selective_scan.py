"""Mamba1 selective scan (prefill, varlen) and its single-step update (decode), per-sequence state slots.

Per channel c and state index n, for each token t of a sequence:
    delta_t = softplus(dt_t + dt_bias)                                   [C]
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t          h: [C, N], fp32
    y_t     = (h_t C_t + D * x_t) * SiLU(z_t)
h_0 is ssm_states[slot] when has_initial_state (always, for the update), else zeros; the final h is
written back. Slots < 0 are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _step(state: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
          C: torch.Tensor, D: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step on fp32 tensors: state [..., C, N], x/delta/z [..., C], B/C [..., N]."""
    state = torch.exp(delta[..., None] * A) * state + (delta * x)[..., None] * B[..., None, :]
    y = ((state * C[..., None, :]).sum(-1) + D * x) * F.silu(z)
    return state, y


def selective_scan_varlen_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                              ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                              has_initial_state: torch.Tensor) -> torch.Tensor:
    """x/dt/z [T, C], A [C, N] fp32, B/C [T, N], D/dt_bias [C] fp32, ssm_states [slots, C, N] -> y [T, C]."""
    y = torch.empty_like(x)
    delta = F.softplus(dt.float() + dt_bias.float())
    starts, slots, init = query_start_loc.tolist(), state_slots.tolist(), has_initial_state.tolist()
    for b, slot in enumerate(slots):
        if slot < 0:
            continue
        state = ssm_states[slot].float() if init[b] else x.new_zeros(ssm_states.shape[1:], dtype=torch.float32)
        for t in range(starts[b], starts[b + 1]):
            state, yt = _step(state, x[t].float(), delta[t], A, B[t].float(), C[t].float(), D, z[t].float())
            y[t] = yt.to(y.dtype)
        ssm_states[slot] = state.to(ssm_states.dtype)
    return y


def selective_scan_update_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                              ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """One token per sequence: x/dt/z [Bt, C], B/C [Bt, N]; padded rows (slot < 0) return zeros."""
    y = torch.zeros_like(x)
    keep = state_slots >= 0
    slots = state_slots[keep].long()
    delta = F.softplus(dt[keep].float() + dt_bias.float())
    state, yk = _step(ssm_states[slots].float(), x[keep].float(), delta, A, B[keep].float(), C[keep].float(),
                      D, z[keep].float())
    ssm_states[slots] = state.to(ssm_states.dtype)
    y[keep] = yk.to(y.dtype)
    return y


@triton.jit
def _softplus(x):
    """torch's softplus (linear above 20), with log1p accuracy for very negative x."""
    u = tl.exp(x)
    w = 1.0 + u
    return tl.where(x > 20.0, x, tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0))))


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    """Composition of h -> a1 h + b1 then h -> a2 h + b2 (associative; scans h_t = a_t h_{t-1} + b_t)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _selective_scan_varlen_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, states_ptr,
                                  qsl_ptr, slots_ptr, init_ptr, y_ptr, CH, N,
                                  stride_xt, stride_xc, stride_dtt, stride_dtc, stride_Ac, stride_An,
                                  stride_Bt, stride_Bn, stride_Ct, stride_Cn, stride_zt, stride_zc,
                                  stride_ss, stride_sc, stride_sn, stride_yt, stride_yc,
                                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sequence program_id(0), channels program_id(1)*BLOCK_C...: the state [BLOCK_C, N] stays in registers
    while time advances BLOCK_T tokens at a time: one load of each input tile, then a parallel associative
    scan over the tile's time axis (instead of BLOCK_T dependent, latency-bound steps). Tiles are laid out
    [channel, state, time], time last; with few channels and one warp a program this measured fastest on an
    H100 (FalconMamba-7B, 4,096 tokens: 1.37 ms against 1.59 ms for [time, channel, state] and 16 channels)."""
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        return
    start = tl.load(qsl_ptr + b)
    end = tl.load(qsl_ptr + b + 1)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    c_ok = c < CH
    n_ok = n < N
    cn_ok = c_ok[:, None] & n_ok[None, :]
    s_ptrs = states_ptr + slot.to(tl.int64) * stride_ss + c[:, None] * stride_sc + n[None, :] * stride_sn
    state = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    if tl.load(init_ptr + b) != 0:
        state = tl.load(s_ptrs, mask=cn_ok, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + c[:, None] * stride_Ac + n[None, :] * stride_An, mask=cn_ok, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, None, :]
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        ct_ok = c_ok[:, None] & t_ok[None, :]
        nt_ok = n_ok[:, None] & t_ok[None, :]
        x = tl.load(x_ptr + t[None, :] * stride_xt + c[:, None] * stride_xc, mask=ct_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + t[None, :] * stride_zt + c[:, None] * stride_zc, mask=ct_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + t[None, :] * stride_dtt + c[:, None] * stride_dtc, mask=ct_ok, other=0.0)
        delta = tl.where(ct_ok, _softplus(dt.to(tl.float32) + dt_bias[:, None]), 0.0)  # 0: identity step
        Bt = tl.load(B_ptr + t[None, :] * stride_Bt + n[:, None] * stride_Bn, mask=nt_ok, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + t[None, :] * stride_Ct + n[:, None] * stride_Cn, mask=nt_ok, other=0.0).to(tl.float32)
        decay = tl.exp(delta[:, None, :] * A[:, :, None])  # [BLOCK_C, BLOCK_N, BLOCK_T]
        inject = (delta * x)[:, None, :] * Bt[None, :, :]
        decay, inject = tl.associative_scan((decay, inject), 2, _linear_recurrence)
        states = decay * state[:, :, None] + inject  # state after each token of the tile
        y = tl.sum(states * Ct[None, :, :], axis=1) + D[:, None] * x
        y = y * (z * tl.sigmoid(z))
        tl.store(y_ptr + t[None, :] * stride_yt + c[:, None] * stride_yc, y.to(y_ptr.dtype.element_ty), mask=ct_ok)
        state = tl.sum(tl.where(last, states, 0.0), axis=2)
    tl.store(s_ptrs, state.to(states_ptr.dtype.element_ty), mask=cn_ok)


def selective_scan_varlen(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                          ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                          has_initial_state: torch.Tensor) -> torch.Tensor:
    """Triton version of selective_scan_varlen_ref (same arguments and result; no host sync)."""
    T, CH = x.shape
    N = A.shape[1]
    num_seqs = state_slots.shape[0]
    y = torch.empty_like(x)
    if T == 0 or num_seqs == 0:
        return y
    BLOCK_T, BLOCK_C = 16, 4
    _selective_scan_varlen_kernel[(num_seqs, triton.cdiv(CH, BLOCK_C))](
        x, dt, A, B, C, D, dt_bias, z, ssm_states, query_start_loc, state_slots, has_initial_state, y, CH, N,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z.stride(), *ssm_states.stride(),
        *y.stride(), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, BLOCK_N=triton.next_power_of_2(N), num_warps=1)
    return y


@triton.jit
def _selective_scan_update_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, states_ptr,
                                  slots_ptr, y_ptr, CH, N,
                                  stride_xb, stride_xc, stride_dtb, stride_dtc, stride_Ac, stride_An,
                                  stride_Bb, stride_Bn, stride_Cb, stride_Cn, stride_zb, stride_zc,
                                  stride_ss, stride_sc, stride_sn, stride_yb, stride_yc,
                                  BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """One decode step of sequence program_id(1) over BLOCK_C channels x all N states, in place by slot:
    one read and one write of the state tile; full N per program so y = h C reduces in registers."""
    b = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CH
    y_ptrs = y_ptr + b * stride_yb + c * stride_yc
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(y_ptrs, tl.zeros((BLOCK_C,), y_ptr.dtype.element_ty), mask=c_ok)
        return
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    cn_ok = c_ok[:, None] & n_ok[None, :]
    x = tl.load(x_ptr + b * stride_xb + c * stride_xc, mask=c_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + c * stride_zc, mask=c_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dtb + c * stride_dtc, mask=c_ok, other=0.0).to(tl.float32)
    delta = _softplus(dt + tl.load(dt_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32))
    A = tl.load(A_ptr + c[:, None] * stride_Ac + n[None, :] * stride_An, mask=cn_ok, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_Bb + n * stride_Bn, mask=n_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_Cb + n * stride_Cn, mask=n_ok, other=0.0).to(tl.float32)
    s_ptrs = states_ptr + slot.to(tl.int64) * stride_ss + c[:, None] * stride_sc + n[None, :] * stride_sn
    state = tl.load(s_ptrs, mask=cn_ok, other=0.0).to(tl.float32)
    state = tl.exp(delta[:, None] * A) * state + (delta * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, state.to(states_ptr.dtype.element_ty), mask=cn_ok)
    y = tl.sum(state * Cv[None, :], axis=1) + tl.load(D_ptr + c, mask=c_ok, other=0.0).to(tl.float32) * x
    tl.store(y_ptrs, (y * z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=c_ok)


def selective_scan_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                          ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """Triton version of selective_scan_update_ref (same arguments and result; CUDA-graph capturable)."""
    Bt, CH = x.shape
    N = A.shape[1]
    y = torch.empty_like(x)
    if Bt == 0:
        return y
    BLOCK_N = triton.next_power_of_2(N)
    # ~4K state elements a program, fewer channels while the grid would be under ~1024 programs.
    BLOCK_C = min(triton.next_power_of_2(CH), max(16, 4096 // BLOCK_N))
    while BLOCK_C > 16 and Bt * triton.cdiv(CH, BLOCK_C) < 1024:
        BLOCK_C //= 2
    _selective_scan_update_kernel[(triton.cdiv(CH, BLOCK_C), Bt)](
        x, dt, A, B, C, D, dt_bias, z, ssm_states, state_slots, y, CH, N,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z.stride(), *ssm_states.stride(),
        *y.stride(), BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, num_warps=4)
    return y
