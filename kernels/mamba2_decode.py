"""Falcon-H1's Mamba2 decode step (one token per sequence) in two kernels instead of three:

    xBC = SiLU(conv_update(xBC))                 (kernels/conv1d.py)
    y   = ssm_state_update(x, dt, B, C)          (kernels/ssm_state_update.py)
    out = gated_rms_norm(y, z)                   (kernels/norm.py)

Kernel 1, per (state rows, head, sequence): the conv of its x channels and of its group's B and C, then the
state update. Every program of a group needs B and C, so their conv state must not move until all have read
it: kernel 2, per (sequence, group), advances the conv state of the group's channels after it normalises
the group's y. Rows whose slot is < 0 (CUDA-graph padding) are skipped and return zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.conv1d import _conv_silu, _conv_state_shift, causal_conv1d_update_ref
from kernels.norm import gated_group_norm, gated_rms_norm_ref
from kernels.ssm_state_update import _head_rows_step, block_p_for, ssm_state_update_ref


def mamba2_decode_step_ref(z: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, conv_weight: torch.Tensor,
                           conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                           dt_limit: tuple[float, float], norm_weight: torch.Tensor, eps: float, n_groups: int,
                           norm_before_gate: bool, conv_states: torch.Tensor, ssm_states: torch.Tensor,
                           state_slots: torch.Tensor) -> torch.Tensor:
    """z [Bt, H*P], xBC [Bt, H*P + 2*G*N] (before the conv), dt [Bt, H] -> gated, normed y [Bt, H*P];
    conv_states and ssm_states advanced in place by slot. The three ops in sequence."""
    Bt, (H, d_ssm) = z.shape[0], (dt.shape[1], z.shape[1])
    GN = (xBC.shape[1] - d_ssm) // 2
    xBC = causal_conv1d_update_ref(xBC, conv_weight, conv_bias, conv_states, state_slots)
    x, B, C = xBC.split([d_ssm, GN, GN], dim=-1)
    y = ssm_state_update_ref(x.reshape(Bt, H, -1), dt, A, B.reshape(Bt, n_groups, -1), C.reshape(Bt, n_groups, -1),
                             D, dt_bias, dt_limit, ssm_states, state_slots)
    return gated_rms_norm_ref(y.reshape(Bt, d_ssm), z, norm_weight, eps, n_groups, norm_before_gate)


@triton.jit
def _conv_ssm_kernel(xBC_ptr, dt_ptr, conv_w_ptr, conv_b_ptr, A_ptr, D_ptr, dt_bias_ptr, conv_ptr, states_ptr,
                     slots_ptr, y_ptr, P, N, d_ssm, GN, heads_per_group, dt_min, dt_max,
                     stride_xb, stride_xc, stride_dtb, stride_dth, stride_wc, stride_wk,
                     stride_cs, stride_cc, stride_ck, stride_ss, stride_sh, stride_sp, stride_sn, stride_yb,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP_DT: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (p-tile, head h, sequence b): x = SiLU(conv) of channels h*P + p, B and C likewise for h's group
    (each rounded to xBC's dtype, as the unfused conv stores them), then the state update of rows p; y (before
    the gate) to y_ptr. Reads the conv state only."""
    b = tl.program_id(2)
    h = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    y_ptrs = y_ptr + b * stride_yb + h * P + p
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(y_ptrs, tl.zeros((BLOCK_P,), y_ptr.dtype.element_ty), mask=p_ok)
        return
    dtype = xBC_ptr.dtype.element_ty
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    row = xBC_ptr + b * stride_xb
    conv_row = conv_ptr + slot.to(tl.int64) * stride_cs
    g = h // heads_per_group
    cx, cB, cC = h * P + p, d_ssm + g * N + n, d_ssm + GN + g * N + n
    x = _conv_silu(tl.load(row + cx * stride_xc, mask=p_ok, other=0.0), conv_row + cx * stride_cc, cx, p_ok,
                   conv_w_ptr, conv_b_ptr, stride_wc, stride_wk, stride_ck, K, HAS_BIAS, BLOCK_K)
    Bv = _conv_silu(tl.load(row + cB * stride_xc, mask=n_ok, other=0.0), conv_row + cB * stride_cc, cB, n_ok,
                    conv_w_ptr, conv_b_ptr, stride_wc, stride_wk, stride_ck, K, HAS_BIAS, BLOCK_K)
    Cv = _conv_silu(tl.load(row + cC * stride_xc, mask=n_ok, other=0.0), conv_row + cC * stride_cc, cC, n_ok,
                    conv_w_ptr, conv_b_ptr, stride_wc, stride_wk, stride_ck, K, HAS_BIAS, BLOCK_K)
    x, Bv, Cv = x.to(dtype).to(tl.float32), Bv.to(dtype).to(tl.float32), Cv.to(dtype).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dtb + h * stride_dth).to(tl.float32)
    y = _head_rows_step(x, Bv, Cv, dt, h, slot, p, p_ok, n, n_ok, A_ptr, D_ptr, dt_bias_ptr, states_ptr,
                        dt_min, dt_max, stride_ss, stride_sh, stride_sp, stride_sn, CLAMP_DT)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _norm_conv_shift_kernel(y_ptr, z_ptr, w_ptr, xBC_ptr, conv_ptr, slots_ptr, out_ptr, group_size, N, d_ssm, GN, eps,
                            stride_zb, stride_xb, stride_xc, stride_cs, stride_cc, stride_ck,
                            K: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (sequence b, group g): out = gated GroupRMS of y's group g (kernels/norm.py), then the conv state
    of the group's x, B and C channels shifts by b's token (kernel 1 has read it by now)."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    i = tl.arange(0, BLOCK_G)
    cols = g * group_size + i
    col_ok = i < group_size
    out_ptrs = out_ptr + b * d_ssm + cols
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(out_ptrs, tl.zeros((BLOCK_G,), out_ptr.dtype.element_ty), mask=col_ok)
        return
    y = tl.load(y_ptr + b * d_ssm + cols, mask=col_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + cols, mask=col_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = gated_group_norm(y[None, :], z[None, :], w[None, :], group_size, eps, NORM_BEFORE_GATE)
    tl.store(out_ptrs[None, :], out.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])
    row = xBC_ptr + b * stride_xb
    conv_row = conv_ptr + slot.to(tl.int64) * stride_cs
    _conv_state_shift(tl.load(row + cols * stride_xc, mask=col_ok, other=0.0), conv_row + cols * stride_cc, col_ok,
                      stride_ck, K, BLOCK_K)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    for k in tl.static_range(2):  # B, then C
        c = d_ssm + k * GN + g * N + n
        _conv_state_shift(tl.load(row + c * stride_xc, mask=n_ok, other=0.0), conv_row + c * stride_cc, n_ok,
                          stride_ck, K, BLOCK_K)


def mamba2_decode_step(z: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, conv_weight: torch.Tensor,
                       conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                       dt_limit: tuple[float, float], norm_weight: torch.Tensor, eps: float, n_groups: int,
                       norm_before_gate: bool, conv_states: torch.Tensor, ssm_states: torch.Tensor,
                       state_slots: torch.Tensor, block_p: int | None = None) -> torch.Tensor:
    """Triton version of mamba2_decode_step_ref (same arguments and result; CUDA-graph capturable).
    block_p: state rows a kernel-1 program (default: the state update's choice; benchmarks compare others)."""
    (Bt, d_ssm), H = z.shape, dt.shape[1]
    GN = (xBC.shape[1] - d_ssm) // 2
    P, N, K = d_ssm // H, GN // n_groups, conv_weight.shape[1]
    assert z.stride(1) == 1 and xBC.stride(1) == 1, "z and xBC: column slices of the in_proj output"
    y = torch.empty(Bt, d_ssm, dtype=xBC.dtype, device=xBC.device)
    out = torch.empty_like(y)
    if Bt == 0:
        return out
    BLOCK_N, BLOCK_K = triton.next_power_of_2(N), triton.next_power_of_2(K - 1)
    BLOCK_P = block_p or block_p_for(Bt, H, P, N)
    _conv_ssm_kernel[(triton.cdiv(P, BLOCK_P), H, Bt)](
        xBC, dt, conv_weight, conv_bias, A, D, dt_bias, conv_states, ssm_states, state_slots, y,
        P, N, d_ssm, GN, H // n_groups, float(dt_limit[0]), float(dt_limit[1]), *xBC.stride(), *dt.stride(),
        *conv_weight.stride(), *conv_states.stride(), *ssm_states.stride(), y.stride(0),
        K=K, HAS_BIAS=conv_bias is not None, CLAMP_DT=tuple(dt_limit) != (0.0, math.inf), BLOCK_K=BLOCK_K,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=4 if BLOCK_P * BLOCK_N >= 2048 else 2)
    group_size = d_ssm // n_groups
    _norm_conv_shift_kernel[(Bt, n_groups)](
        y, z, norm_weight, xBC, conv_states, state_slots, out, group_size, N, d_ssm, GN, eps, z.stride(0),
        *xBC.stride(), *conv_states.stride(), K=K, NORM_BEFORE_GATE=norm_before_gate, BLOCK_K=BLOCK_K,
        BLOCK_G=triton.next_power_of_2(group_size), BLOCK_N=BLOCK_N,
        num_warps=max(1, min(16, triton.next_power_of_2(group_size) // 512)))
    return out
