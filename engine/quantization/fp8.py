"""An FP8 linear layer: float8_e4m3 weight [N, K] and one fp32 scale per output row, quantized from the
16-bit checkpoint weight (multipliers already folded in) as it is loaded."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from kernels.fp8_linear import quantize_fp8_weight


class FP8Linear(nn.Module):
    method = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        # Computed from the checkpoint's weight, not read from it: not persistent.
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """The loader's hook: a full-precision `weight` is quantized here; anything else is copied."""
        if name == "weight":
            q, scale = quantize_fp8_weight(tensor.to(self.weight.device))
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)
        else:
            getattr(self, name).copy_(tensor)

    def finalize(self, name: str) -> None:
        pass

    @torch.no_grad()
    def init_dummy(self, generator: torch.Generator) -> None:
        w = torch.empty(self.weight.shape, device=self.weight.device).normal_(0.0, 0.02, generator=generator)
        self.load_tensor("weight", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_linear(x, self)

    @classmethod
    def concat(cls, parts: list[FP8Linear]) -> FP8Linear:
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        fused.register_buffer("weight", torch.cat([p.weight for p in parts]))
        fused.register_buffer("weight_scale", torch.cat([p.weight_scale for p in parts]), persistent=False)
        return fused
