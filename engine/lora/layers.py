"""The projections adapters apply to, wrapped so that each row of the batch gets its adapter's delta.

A model lists its LoRA targets (`lora_targets()`): each layer whose output an adapter can change; a fused
layer (engine/quantization/fused.py) computes one checkpoint module per slice of its output (Falcon-H1's
Mamba in_proj | q | k | v is four).
`install_lora` wraps each in a LoRALinear holding fixed-size stacks [max_loras, ...] of every slot's A
and B (kernels/lora.py); a 16-bit nn.Linear (fused or not) instead becomes a StackedLoRALinear, whose
weight carries every slot's A under W, so that the shrink costs no launch of its own. The rows' slots come from one
LoRAContext shared by all layers, set per step by the model runner (or pointing at the CUDA graphs'
static slot buffer); a hook at the start of the model's forward groups the rows by slot once for all
layers (inside a captured graph, too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.quantization import part_modules
from kernels.lora import LoRARows, group_rows


@dataclass(frozen=True)
class LoRATarget:
    path: str  # the module in our model whose output gets the delta
    in_features: int
    slices: tuple[tuple[str, int], ...]  # (checkpoint module name, output size), in output order


class LoRAContext:
    """The adapter slot of each row of the current forward (None: no row uses an adapter)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.row_slots: torch.Tensor | None = None
        self.rows: LoRARows | None = None  # row_slots grouped by slot, at the start of each forward

    def group(self) -> None:
        self.rows = group_rows(self.row_slots, self.num_slots) if self.row_slots is not None else None


class LoRALinear(nn.Module):
    """Any base layer (a quantized one too) plus the delta by the shrink and expand kernels."""

    def __init__(self, base: nn.Module, target: LoRATarget, max_loras: int, max_rank: int, context: LoRAContext,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base, self.context, self.max_rank = base, context, max_rank
        self.in_features = target.in_features
        sizes = [n for _, n in target.slices]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.register_buffer("lora_a", torch.zeros(max_loras, len(sizes) * max_rank, target.in_features,
                                                   dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_loras, sum(sizes), max_rank, dtype=dtype, device=device))
        self.register_buffer("slice_starts", torch.tensor([*self.offsets, sum(sizes)], dtype=torch.int32,
                                                          device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.context.rows
        if rows is None:
            return y
        return ops.lora_delta(x, y, self.lora_a, self.lora_b, self.slice_starts, max(self.sizes), rows)

    def slot_a(self, slot: int) -> torch.Tensor:
        """Slot's A rows [S*R, in]: slice s owns rows s*R .. s*R+R-1."""
        return self.lora_a[slot]

    @torch.no_grad()
    def set_slice(self, slot: int, index: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Slot's adapter for slice `index`: A [r, in], B [out, r] (None: the adapter leaves it alone)."""
        R, start, n = self.max_rank, self.offsets[index], self.sizes[index]
        slot_a = self.slot_a(slot)
        slot_a[index * R:(index + 1) * R].zero_()
        self.lora_b[slot, start:start + n].zero_()
        if a is not None:
            r = a.shape[0]
            slot_a[index * R:index * R + r].copy_(a)
            self.lora_b[slot, start:start + n, :r].copy_(b)


class StackedLoRALinear(LoRALinear):
    """A plain matrix base: its weight is [W; A_0; ...; A_{L-1}], so one matmul gives y and x A^T of every
    slot (a few % more weight bytes), and only the expand runs as a launch of its own. At decode the LoRA
    cost is mostly launches, so this halves it."""

    def __init__(self, base: nn.Linear, target: LoRATarget, max_loras: int, max_rank: int, context: LoRAContext,
                 dtype: torch.dtype, device: torch.device):
        nn.Module.__init__(self)
        self.context, self.max_rank, self.in_features = context, max_rank, target.in_features
        sizes = [n for _, n in target.slices]
        self.offsets, self.sizes, self.out_features = [sum(sizes[:i]) for i in range(len(sizes))], sizes, sum(sizes)
        stacked = max_loras * len(sizes) * max_rank
        weight = base.weight.new_zeros(self.out_features + stacked, self.in_features)
        weight[:self.out_features] = base.weight.detach()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if base.bias is None else
                             torch.cat([base.bias.detach(), base.bias.new_zeros(stacked)]))
        self.register_buffer("lora_b", torch.zeros(max_loras, sum(sizes), max_rank, dtype=dtype, device=device))
        self.register_buffer("slice_starts", torch.tensor([*self.offsets, sum(sizes)], dtype=torch.int32,
                                                          device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        y, h_all = out[..., :self.out_features], out[..., self.out_features:]
        rows = self.context.rows
        if rows is None:
            return y
        return ops.lora_expand(h_all, y, self.lora_b, self.slice_starts, max(self.sizes), rows)

    def slot_a(self, slot: int) -> torch.Tensor:
        rows = len(self.sizes) * self.max_rank
        start = self.out_features + slot * rows
        return self.weight[start:start + rows]


def install_lora(model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[LoRAContext, dict[str, tuple[LoRALinear, int]]]:
    """Wraps the model's LoRA targets; returns the shared context and, per checkpoint module name, the
    wrapped layer and slice that computes it."""
    context = LoRAContext(max_loras)
    model.register_forward_pre_hook(lambda module, args: context.group())
    slices: dict[str, tuple[LoRALinear, int]] = {}
    for path in model.lora_targets():
        owner, _, attr = path.rpartition(".")
        parent, base = model.get_submodule(owner), model.get_submodule(path)
        target = LoRATarget(path, base.in_features, tuple(part_modules(path, base)))
        wrapper = StackedLoRALinear if isinstance(base, nn.Linear) else LoRALinear  # FusedLinear is one
        layer = wrapper(base, target, max_loras, max_rank, context, dtype, device)
        setattr(parent, attr, layer)
        for i, (name, _) in enumerate(target.slices):
            slices[name] = (layer, i)
    return context, slices
