"""RMSNorm (optionally weightless, optionally fused with the residual add) and grouped gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w * cast_back(x * rsqrt(mean(x^2) + eps)), statistics in fp32; weight None = weightless."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x (in the residual's dtype); returns (rms_norm(h cast to weight dtype), h)."""
    h = residual + x.to(residual.dtype)
    return rms_norm_ref(h.to(weight.dtype), weight, eps), h


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                       n_groups: int, norm_before_gate: bool) -> torch.Tensor:
    """Mamba2's gate + grouped RMSNorm on y [T, D]; each of n_groups contiguous slices is normalised alone.

    norm_before_gate: GroupRMS(y) * w * SiLU(z); otherwise GroupRMS(y * SiLU(z)) * w.
    """
    T, D = y.shape
    h = y.float()
    gate = F.silu(z.float())
    if not norm_before_gate:
        h = h * gate
    h = h.view(T, n_groups, D // n_groups)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).view(T, D) * weight.float()
    if norm_before_gate:
        h = h * gate
    return h.to(y.dtype)
