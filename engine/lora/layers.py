"""The projections adapters apply to, wrapped so that each row of the batch gets its adapter's delta.

A model lists its LoRA targets (`lora_targets()`): each layer whose output an adapter can change, with
the checkpoint modules it computes as slices of its output (a fused Mamba in_proj | q | k | v is four).
`install_lora` wraps each in a LoRALinear holding fixed-size stacks [max_loras, ...] of every slot's A
and B (kernels/lora.py). The rows' slots come from one LoRAContext shared by all layers, set per step
by the model runner (or pointing at the CUDA graphs' static slot buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import ops


@dataclass(frozen=True)
class LoRATarget:
    path: str  # the module in our model whose output gets the delta
    in_features: int
    slices: tuple[tuple[str, int], ...]  # (checkpoint module name, output size), in output order


class LoRAContext:
    """The adapter slot of each row of the current forward (None: no row uses an adapter)."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, target: LoRATarget, max_loras: int, max_rank: int, context: LoRAContext,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base, self.context, self.max_rank = base, context, max_rank
        sizes = [n for _, n in target.slices]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.register_buffer("lora_a", torch.zeros(max_loras, len(sizes) * max_rank, target.in_features,
                                                   dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_loras, sum(sizes), max_rank, dtype=dtype, device=device))
        self.register_buffer("col_slice", torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32), torch.tensor(sizes)).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.context.row_slots is None:
            return y
        shape = y.shape
        out = ops.lora_delta(x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1]), self.lora_a, self.lora_b,
                             self.col_slice, self.context.row_slots)
        return out.view(shape)

    @torch.no_grad()
    def set_slice(self, slot: int, index: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Slot's adapter for slice `index`: A [r, in], B [out, r] (None: the adapter leaves it alone)."""
        R, start, n = self.max_rank, self.offsets[index], self.sizes[index]
        self.lora_a[slot, index * R:(index + 1) * R].zero_()
        self.lora_b[slot, start:start + n].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_a[slot, index * R:index * R + r].copy_(a)
            self.lora_b[slot, start:start + n, :r].copy_(b)


def install_lora(model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[LoRAContext, dict[str, tuple[LoRALinear, int]]]:
    """Wraps the model's LoRA targets; returns the shared context and, per checkpoint module name, the
    wrapped layer and slice that computes it."""
    context = LoRAContext()
    slices: dict[str, tuple[LoRALinear, int]] = {}
    for target in model.lora_targets():
        owner, _, attr = target.path.rpartition(".")
        parent = model.get_submodule(owner)
        layer = LoRALinear(getattr(parent, attr), target, max_loras, max_rank, context, dtype, device)
        setattr(parent, attr, layer)
        for i, (name, _) in enumerate(target.slices):
            slices[name] = (layer, i)
    return context, slices
