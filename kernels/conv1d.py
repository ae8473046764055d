"""Causal depthwise conv1d + SiLU over the flat varlen batch, with per-sequence conv-state slots.

conv_states [num_slots, C, K-1] hold each sequence's last K-1 raw (pre-conv) inputs, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
