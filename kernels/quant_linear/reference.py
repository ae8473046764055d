"""Torch references of the GPTQ linear layer in its runtime layout (kernels/quant_linear/__init__.py describes
it): W dequantized, and the product the kernels are tested against (and the CPU path).
"""

from __future__ import annotations

import torch


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """W^T [K, N_w] in float32 from the runtime layout above (N_w: the stored columns, padding included)."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits
    q = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [K / pack, pack, N]
    q = q.reshape(-1, qweight.shape[1])
    group = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros[group].int()).float() * scales[group].float()


def gptq_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                    out_features: int | None = None) -> torch.Tensor:
    """x [M, K] -> [M, out_features] in x's dtype: gather by perm, dequantize, matmul in float32, add bias.
    out_features: the real columns when the stored ones are padded (default: all)."""
    if perm is not None:
        x = x[:, perm]
    N = out_features or qweight.shape[1]
    y = x.float() @ dequantize_ref(qweight, scales, zeros, bits, group_size)[:, :N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
