"""Mamba2 selective scan for prefill (SSD) over the flat varlen batch, state in per-sequence slots.

For each sequence, head h (group g = h // (H / G)), token t:
    dt_t = clamp(softplus(dt_raw_t + dt_bias), *dt_limit)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t        S: [P, N], fp32
    y_t  = S_t C_t + D * x_t
S_0 is ssm_states[slot] when has_initial_state, else zeros; the final S is written back to the slot.
The Triton kernel computes the same thing chunk by chunk (SSD); chunk_size changes only rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
