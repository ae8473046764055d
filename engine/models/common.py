"""Small building blocks shared by the models."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops


@torch.no_grad()
def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One linear layer computing the concatenated outputs of several that read the same input."""
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(lin.bias is not None for lin in linears),
                      device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight)
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([lin.bias if lin.bias is not None else weight.new_zeros(lin.out_features)
                                    for lin in linears]))
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)
