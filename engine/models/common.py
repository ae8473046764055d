"""Small building blocks shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.quantization import part_modules


def checkpoint_names(model: nn.Module) -> set[str]:
    """The checkpoint tensors the model's parameters and buffers are loaded from: their own names, except that a
    projection built from parts (engine/quantization/fused.py) is each part's checkpoint module's tensors."""
    names = set(model.state_dict())
    for path, layer in model.named_modules():
        if hasattr(layer, "parts"):
            names -= {f"{path}.{t}" for t in layer.state_dict()}
            names |= {f"{module}.{t}" for i, (module, _) in enumerate(part_modules(path, layer))
                      for t in layer.checkpoint_tensors(i)}
    return names


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
