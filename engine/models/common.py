"""Small building blocks shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.quantization import fuse_quantized


@torch.no_grad()
def fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """One linear layer computing the concatenated outputs of several that read the same input."""
    if not all(type(lin) is nn.Linear for lin in linears):
        return fuse_quantized(linears)
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


VOCAB_ALIGN = 128  # an odd vocabulary (Falcon-H1's 130,049) makes cuBLAS fall back to pre-Hopper GEMM kernels


def padded_vocab_size(vocab_size: int, tp_size: int = 1) -> int:
    """Rows of the head (and, under tensor parallelism, the embedding): VOCAB_ALIGN per rank."""
    align = VOCAB_ALIGN * tp_size
    return -(-vocab_size // align) * align


def pad_vocab_rows(tensor: torch.Tensor, tp_size: int = 1) -> torch.Tensor:
    """A checkpoint's [vocab, d] table with zero rows appended up to padded_vocab_size."""
    return F.pad(tensor, (0, 0, 0, padded_vocab_size(tensor.shape[0], tp_size) - tensor.shape[0]))
