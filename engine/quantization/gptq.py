"""A GPTQ linear layer: the checkpoint's tensors (qweight, qzeros, scales, g_idx, bias) loaded by name,
then turned into the layout kernels/quant_linear.py reads (unpacked zero points, act-order channels
sorted so that groups are contiguous)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.quantization.config import GPTQConfig

logger = logging.getLogger(__name__)


class GPTQLoadError(ValueError):
    pass


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The 32/bits values packed into each int32 along `dim`, lowest bits first, as int32 (unsigned)."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    if dim == 0:
        q = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return q.reshape(-1, packed.shape[1])
    q = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)


def pack_int32_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_int32(., bits, dim=0): q [K, N] with values < 2^bits -> [K / pack, N] int32."""
    pack = 32 // bits
    q = q.to(torch.int64).reshape(-1, pack, q.shape[1])
    shifts = torch.arange(pack, device=q.device, dtype=torch.int64) * bits
    packed = (q << shifts[None, :, None]).sum(dim=1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # two's complement in int32


COLUMN_PADDING = 64  # stored columns: a multiple of this, so the kernel's row loads are aligned and vectorize


def pad_columns(t: torch.Tensor) -> torch.Tensor:
    return F.pad(t, (0, -t.shape[1] % COLUMN_PADDING))


class GPTQLinear(nn.Module):
    method = "gptq"
    optional_checkpoint_tensors = ("g_idx",)

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: GPTQConfig):
        super().__init__()
        pack = quant.pack_factor
        if in_features % pack or out_features % pack:
            raise GPTQLoadError(f"GPTQ {quant.bits}-bit layers need in and out features divisible by {pack}, got "
                                f"{in_features} x {out_features}")
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.bits = quant.bits
        self.group_size = in_features if quant.group_size == -1 else quant.group_size
        groups = -(-in_features // self.group_size)
        # Scales stay fp16 as stored (fp32 in a float32 model): bf16 would lose 3 bits of every scale.
        scale_dtype = torch.float32 if torch.get_default_dtype() == torch.float32 else torch.float16
        i32 = dict(dtype=torch.int32)
        self.register_buffer("qweight", torch.zeros(in_features // pack, out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // pack, **i32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype))
        # Checkpoints without act-order may leave g_idx out: then channel k is in group k // group_size.
        self.register_buffer("g_idx", (torch.arange(in_features) // self.group_size).to(torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # The kernel's layout, filled by finalize() (not checkpoint tensors, so not persistent).
        self.register_buffer("zeros", None, persistent=False)
        self.register_buffer("perm", None, persistent=False)

    @torch.no_grad()
    def finalize(self, name: str) -> None:
        """From the checkpoint's layout to the kernel's; `name` is for error messages."""
        q = unpack_int32(self.qweight, self.bits, dim=0)
        zeros = unpack_int32(self.qzeros, self.bits, dim=1)
        if self.quant.zeros_offset_by_one:
            zeros = zeros + 1
        g_idx = self.g_idx.long()
        groups = self.scales.shape[0]
        if g_idx.min() < 0 or g_idx.max() >= groups:
            raise GPTQLoadError(f"{name}.g_idx: group indices must be in [0, {groups}), got "
                                f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        perm = torch.argsort(g_idx, stable=True)
        contiguous = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        if not torch.equal(g_idx[perm], contiguous):
            raise GPTQLoadError(f"{name}.g_idx: every group must hold exactly group_size={self.group_size} input "
                                "channels (the last one the rest)")
        if torch.equal(perm, torch.arange(self.in_features, device=perm.device)):
            self.perm = None
        else:
            self.perm = perm.to(torch.int32)
            q = q[perm]
        self.qweight = pad_columns(pack_int32_rows(q, self.bits))
        self.scales = pad_columns(self.scales)
        self.zeros = pad_columns(zeros.to(torch.int16))
        del self.qzeros, self.g_idx

    def init_dummy(self, generator: torch.Generator) -> None:
        """Random codes and weight-like scales, already in the kernel's layout (benchmarks)."""
        info = torch.iinfo(torch.int32)
        self.qweight = pad_columns(self.qweight.random_(info.min, info.max, generator=generator))
        scales = torch.empty(self.scales.shape, device=self.scales.device).uniform_(0.5, 1.5, generator=generator)
        # drawn in fp32: the same weights in any dtype
        self.scales = pad_columns((scales * (0.04 / (1 << self.bits))).to(self.scales.dtype))
        self.zeros = torch.full(self.scales.shape, 1 << (self.bits - 1), dtype=torch.int16, device=self.scales.device)
        if self.quant.desc_act:  # one permutation per input size, so that layers over one input still fuse
            device = self.scales.device
            same_input = torch.Generator(device=device).manual_seed(self.in_features)
            self.perm = torch.randperm(self.in_features, generator=same_input, device=device).to(torch.int32)
        del self.qzeros, self.g_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_linear(x, self)

    @classmethod
    def concat(cls, parts: list[GPTQLinear]) -> GPTQLinear | str:
        """One layer (bias left to the caller) computing the parts' outputs side by side, or why it cannot."""
        first = parts[0]
        for p in parts[1:]:
            if p.quant != first.quant:
                return "their quantization configs differ"
            if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
                return "their act-order permutations (g_idx) differ"
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.quant, fused.bits, fused.group_size = first.quant, first.bits, first.group_size
        for name in ("qweight", "scales", "zeros"):  # the parts' real columns side by side, padded once
            fused.register_buffer(name, pad_columns(torch.cat([getattr(p, name)[:, :p.out_features] for p in parts],
                                                              dim=1)), persistent=name != "zeros")
        fused.register_buffer("perm", first.perm, persistent=False)
        return fused
