"""An FP8 linear layer: float8_e4m3 weight [N, K] and one fp32 scale per output row, either quantized from
the 16-bit checkpoint weight (multipliers already folded in) as it is loaded, or an FP8 checkpoint's codes
with its scales (the multipliers folded into them)."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.quantization.config import FP8Config
from kernels.fp8_linear import quantize_fp8_weight


def _check_shape(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}")


class FP8Linear(nn.Module):
    method = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: FP8Config):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        # Read from an FP8 checkpoint (then persistent), or computed from a 16-bit weight.
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32),
                             persistent=quant.from_checkpoint)
        if quant.static_input_scale:  # read so that the checkpoint matches; activations are quantized per token
            self.register_buffer("input_scale", torch.ones(()), persistent=True)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """The loader's hook. `weight`: fp8 codes are copied, a full-precision weight is quantized;
        `weight_scale`: one per tensor or per output row, stored per row."""
        if name == "weight":
            _check_shape(name, tensor, self.weight.shape)
            if tensor.dtype == torch.float8_e4m3fn:
                self.weight.copy_(tensor)
            else:
                q, scale = quantize_fp8_weight(tensor.to(self.weight.device))
                self.weight.copy_(q)
                self.weight_scale.copy_(scale)
        elif name == "weight_scale":
            if tensor.numel() not in (1, self.out_features):
                raise ValueError(f"weight_scale has shape {tuple(tensor.shape)}: expected one scale per tensor or "
                                 f"one per output row ({self.out_features})")
            self.weight_scale.copy_(tensor.reshape(-1).expand(self.out_features))
        else:
            _check_shape(name, tensor, getattr(self, name).shape)
            getattr(self, name).copy_(tensor)

    def finalize(self, name: str) -> None:
        pass

    @torch.no_grad()
    def init_dummy(self, generator: torch.Generator) -> None:
        w = torch.empty(self.weight.shape, device=self.weight.device).normal_(0.0, 0.02, generator=generator)
        q, scale = quantize_fp8_weight(w)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)

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
