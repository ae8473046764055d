"""An FP8 linear layer: float8_e4m3 weight [N, K] and one fp32 scale per output row, either quantized from
the 16-bit checkpoint weight (multipliers already folded in) as it is loaded, or an FP8 checkpoint's codes
with its scales (the multipliers folded into them)."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.quantization.config import FP8Config
from engine.quantization.fused import Part, copy_checked, part_rows
from kernels.fp8_linear import quantize_fp8_weight


class FP8Linear(nn.Module):
    """One projection, or several over one input fused (`parts`, each loaded into its own rows)."""

    method = "fp8"

    def __init__(self, in_features: int, parts: list[Part], quant: FP8Config):
        super().__init__()
        self.in_features, self.out_features = in_features, sum(p.rows for p in parts)
        self.parts, self.quant = parts, quant
        self.register_buffer("weight", torch.zeros(self.out_features, in_features, dtype=torch.float8_e4m3fn))
        # Read from an FP8 checkpoint, or computed from a 16-bit weight.
        self.register_buffer("weight_scale", torch.ones(self.out_features, dtype=torch.float32))
        if quant.static_input_scale:  # one per part, read so that the checkpoint matches; activations are
            self.register_buffer("input_scale", torch.ones(len(parts)))  # quantized per token instead
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if any(p.bias for p in parts) else None

    def checkpoint_tensors(self, part: int) -> list[str]:
        q = self.quant
        return (["weight"] + (["weight_scale"] if q.from_checkpoint else []) + (["input_scale"] if q.static_input_scale
                else []) + (["bias"] if self.parts[part].bias else []))

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor, part: int) -> None:
        """The loader's hook, for one part's tensor. `weight`: fp8 codes are copied, a full-precision weight is
        quantized; `weight_scale`: one per tensor or per output row, stored per row."""
        rows = part_rows(self.parts, part)
        if name == "weight":
            if tensor.dtype == torch.float8_e4m3fn:
                copy_checked(self.weight[rows], tensor)
            else:  # a 16-bit weight, quantized here with one scale per row
                q, scale = quantize_fp8_weight(tensor.to(self.weight.device))
                copy_checked(self.weight[rows], q)
                self.weight_scale[rows] = scale
        elif name == "weight_scale":
            n = rows.stop - rows.start
            if tensor.numel() not in (1, n):
                raise ValueError(f"has shape {tuple(tensor.shape)}: expected one scale per tensor or one per output "
                                 f"row ({n})")
            self.weight_scale[rows] = tensor.reshape(-1).expand(n)
        elif name == "input_scale":  # a scalar, or [1] as compressed-tensors stores it
            copy_checked(self.input_scale[part:part + 1], tensor.reshape(-1))
        else:
            copy_checked(self.bias[rows], tensor)

    def finalize(self, names: list[str]) -> None:
        pass

    @torch.no_grad()
    def init_dummy(self, generator: torch.Generator) -> None:
        w = torch.empty(self.weight.shape, device=self.weight.device).normal_(0.0, 0.02, generator=generator)
        q, scale = quantize_fp8_weight(w)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_linear(x, self)
