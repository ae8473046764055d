"""Mamba2 selective state update for decode: one token per sequence, state updated in place by slot.

Same recurrence as ssd_scan.py for a single step (always continuing from ssm_states[slot]):
    S <- exp(dt * A) * S + dt * x (outer) B;   y = S C + D * x       (fp32 math)
Rows whose slot is < 0 (CUDA-graph padding) are skipped and return zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
