"""What models build their projections with: a plain, GPTQ or FP8 linear layer per the model's
quantization config, one projection or several that read the same input fused into one (engine/quantization/
fused.py)."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.quantization.config import FP8Config, GPTQConfig, QuantConfig
from engine.quantization.fp8 import FP8Linear
from engine.quantization.fused import Part, copy_checked, part_rows
from engine.quantization.gptq import GPTQLinear

QUANTIZED_LINEARS = (GPTQLinear, FP8Linear)


class Linear(nn.Linear):
    """A 16-bit projection whose matmul is ops.linear (one decode row may take the Triton GEMV)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    """Several 16-bit projections over one input as one matmul, each part loaded into its own rows
    (a part without bias keeps zeros there)."""

    def __init__(self, in_features: int, parts: list[Part]):
        super().__init__(in_features, sum(p.rows for p in parts), bias=any(p.bias for p in parts))
        self.parts = parts
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def checkpoint_tensors(self, part: int) -> list[str]:
        return ["weight", "bias"] if self.parts[part].bias else ["weight"]

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor, part: int) -> None:
        copy_checked(getattr(self, name)[part_rows(self.parts, part)], tensor)


def _quantized(in_features: int, parts: list[Part], quant: QuantConfig) -> nn.Module:
    if isinstance(quant, GPTQConfig):
        return GPTQLinear(in_features, parts, quant)
    assert isinstance(quant, FP8Config)
    return FP8Linear(in_features, parts, quant)


def linear(in_features: int, out_features: int, bias: bool, quant: QuantConfig | None) -> nn.Module:
    if quant is None:
        return Linear(in_features, out_features, bias=bias)
    return _quantized(in_features, [Part(None, out_features, bias)], quant)


def fused_linear(in_features: int, parts: list[Part], quant: QuantConfig | None) -> nn.Module:
    """One layer computing the parts' outputs side by side: fewer, larger matmuls stream the weights faster
    at small batch."""
    return FusedLinear(in_features, parts) if quant is None else _quantized(in_features, parts, quant)
