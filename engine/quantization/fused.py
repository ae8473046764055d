"""Fused projections: one layer whose output rows are several checkpoint modules side by side (its
`parts`), declared where the model is built. The loader writes each checkpoint tensor straight into
its part's rows (or, for GPTQ, columns), so no step after loading rewires modules."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Part(NamedTuple):
    name: str | None  # the checkpoint module, relative to the fused layer's parent; None: the layer itself
    rows: int  # its output features (this rank's, under tensor parallelism)
    bias: bool


def part_rows(parts: list[Part], index: int) -> slice:
    """The output rows of parts[index] in the fused layer."""
    start = sum(p.rows for p in parts[:index])
    return slice(start, start + parts[index].rows)


def part_modules(path: str, layer: nn.Module) -> list[tuple[str, int]]:
    """(checkpoint module name, output features) of each part of the layer at `path`; a layer without
    parts stands for one module, itself."""
    parts = getattr(layer, "parts", None)
    if parts is None:
        return [(path, layer.out_features)]
    parent = path.rpartition(".")[0]
    return [(path if p.name is None else f"{parent}.{p.name}" if parent else p.name, p.rows) for p in parts]


def copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """target (a parameter, buffer or a view of one) = tensor; ValueError if the shapes differ."""
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    target.copy_(tensor)
