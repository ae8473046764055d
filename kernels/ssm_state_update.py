"""Mamba2 selective state update for decode: one token per sequence, state updated in place by slot.

Same recurrence as ssd_scan.py for a single step (always continuing from ssm_states[slot]):
    S <- exp(dt * A) * S + dt * x (outer) B;   y = S C + D * x       (fp32 math)
Rows whose slot is < 0 (CUDA-graph padding) are skipped and return zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl
from kernels.pdl import wait_for_predecessor
from kernels.triton_math import softplus


def ssm_state_update_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float],
                         ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """x [Bt, H, P], dt [Bt, H], B/C [Bt, G, N], ssm_states [slots, H, P, N] -> y [Bt, H, P]."""
    H, G = x.shape[1], B.shape[1]
    y = torch.zeros_like(x)
    keep = state_slots >= 0
    slots = state_slots[keep].long()
    xk = x[keep].float()
    dtk = F.softplus(dt[keep].float() + dt_bias.float()).clamp(*dt_limit)  # [b, H]
    Bk = B[keep].float().repeat_interleave(H // G, dim=1)  # [b, H, N]
    Ck = C[keep].float().repeat_interleave(H // G, dim=1)
    state = ssm_states[slots].float()
    state = torch.exp(dtk * A)[:, :, None, None] * state + (dtk[:, :, None] * xk)[..., None] * Bk[:, :, None, :]
    ssm_states[slots] = state.to(ssm_states.dtype)
    y[keep] = (torch.einsum("bhpn,bhn->bhp", state, Ck) + D[:, None] * xk).to(x.dtype)
    return y


@triton.jit
def _ssm_state_update_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, states_ptr, slots_ptr, y_ptr,
                             P, N, heads_per_group, dt_min, dt_max,
                             stride_xb, stride_xh, stride_xp, stride_dtb, stride_dth,
                             stride_Bb, stride_Bg, stride_Bn, stride_Cb, stride_Cg, stride_Cn,
                             stride_ss, stride_sh, stride_sp, stride_sn, stride_yb, stride_yh, stride_yp,
                             CLAMP_DT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                             USE_PDL: tl.constexpr):
    """S[p-tile, :] of sequence program_id(2), head program_id(1): one read and one write of its state rows.
    A program owns BLOCK_P full rows of N so that y = S C reduces in registers; the wrapper picks BLOCK_P
    small enough that even one sequence spreads its heads x P rows over all SMs."""
    b = tl.program_id(2)
    h = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    y_ptrs = y_ptr + b * stride_yb + h * stride_yh + p * stride_yp
    wait_for_predecessor(USE_PDL)  # before the early return too: every program waits (kernels/pdl.py)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(y_ptrs, tl.zeros((BLOCK_P,), y_ptr.dtype.element_ty), mask=p_ok)
        return
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = h // heads_per_group
    dt = tl.load(dt_ptr + b * stride_dtb + h * stride_dth).to(tl.float32)
    dt = softplus(dt + tl.load(dt_bias_ptr + h).to(tl.float32))
    if CLAMP_DT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + p * stride_xp, mask=p_ok, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_Bb + g * stride_Bg + n * stride_Bn, mask=n_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_Cb + g * stride_Cg + n * stride_Cn, mask=n_ok, other=0.0).to(tl.float32)
    s_ptrs = (states_ptr + slot.to(tl.int64) * stride_ss + h * stride_sh
              + p[:, None] * stride_sp + n[None, :] * stride_sn)
    s_ok = p_ok[:, None] & n_ok[None, :]
    state = tl.load(s_ptrs, mask=s_ok, other=0.0).to(tl.float32)
    state = decay * state + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, state.to(states_ptr.dtype.element_ty), mask=s_ok)
    y = tl.sum(state * Cv[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=p_ok)


def ssm_state_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float],
                     ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """Triton version of ssm_state_update_ref (same arguments and result; CUDA-graph capturable)."""
    Bt, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    y = torch.empty_like(x)
    if Bt == 0:
        return y
    BLOCK_N = triton.next_power_of_2(N)
    # ~4K state elements a program, fewer rows while the grid would be under ~1024 programs.
    BLOCK_P = min(triton.next_power_of_2(P), max(1, 4096 // BLOCK_N))
    while BLOCK_P > 2 and Bt * H * triton.cdiv(P, BLOCK_P) < 1024:
        BLOCK_P //= 2
    _ssm_state_update_kernel[(triton.cdiv(P, BLOCK_P), H, Bt)](
        x, dt, A, B, C, D, dt_bias, ssm_states, state_slots, y,
        P, N, H // G, float(dt_limit[0]), float(dt_limit[1]), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        *ssm_states.stride(), *y.stride(),
        CLAMP_DT=tuple(dt_limit) != (0.0, math.inf), BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        num_warps=4 if BLOCK_P * BLOCK_N >= 2048 else 2, **pdl.launch_kwargs(x.device))
    return y
