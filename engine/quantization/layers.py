"""What models build their projections with: a plain, GPTQ or FP8 linear layer per the model's
quantization config, and fusing several that read the same input into one."""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.quantization.config import FP8Config, GPTQConfig, QuantConfig
from engine.quantization.fp8 import FP8Linear
from engine.quantization.gptq import GPTQLinear

logger = logging.getLogger(__name__)

QUANTIZED_LINEARS = (GPTQLinear, FP8Linear)


def linear(in_features: int, out_features: int, bias: bool, quant: QuantConfig | None) -> nn.Module:
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if isinstance(quant, GPTQConfig):
        return GPTQLinear(in_features, out_features, bias, quant)
    assert isinstance(quant, FP8Config)
    return FP8Linear(in_features, out_features, bias, quant)


class ConcatLinear(nn.Module):
    """Several layers over one input whose outputs are concatenated: quantized parts that cannot share
    one kernel call."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse_quantized(linears: list[nn.Module]) -> nn.Module:
    """One layer for quantized linears that read the same input; ConcatLinear (logged) where they cannot fuse."""
    kinds = {type(lin) for lin in linears}
    fused = linears[0].concat(linears) if len(kinds) == 1 else "some are quantized and some are not"
    if isinstance(fused, str):
        logger.info("%d projections over the same input stay separate matmuls: %s", len(linears), fused)
        return ConcatLinear(linears)
    if any(lin.bias is not None for lin in linears):
        like = next(lin.bias for lin in linears if lin.bias is not None)
        fused.bias = nn.Parameter(torch.cat([lin.bias if lin.bias is not None else like.new_zeros(lin.out_features)
                                             for lin in linears]))
    else:
        fused.bias = None
    return fused
