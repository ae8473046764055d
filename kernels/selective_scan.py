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
