"""A GPTQ linear layer: the checkpoint's tensors (qweight, qzeros, scales, g_idx, bias; or compressed-tensors'
pack-quantized weight_packed, weight_zero_point, weight_scale, weight_g_idx, which are the same words transposed;
or AWQ's qweight and qzeros, packed along the output in AWQ's order, repacked here) loaded by name, then turned
into the layout kernels/quant_linear/ reads (unpacked zero points, act-order channels sorted so that groups are
contiguous)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.quantization.config import GPTQConfig
from engine.quantization.fused import Part, copy_checked, part_rows

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


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: slot i of a word holds column 8 c + AWQ_ORDER[i]


def unpack_awq_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """AWQ's [R, C / 8] words (packed along the columns in AWQ_ORDER) -> the [R, C] values in column order."""
    q = unpack_int32(packed, bits, dim=1)  # in slot order
    pack = 32 // bits
    slot_of_column = torch.tensor(AWQ_ORDER, device=packed.device).argsort()
    columns = torch.arange(q.shape[1], device=packed.device)
    return q[:, columns - columns % pack + slot_of_column[columns % pack]]


COLUMN_PADDING = 64  # stored columns: a multiple of this, so the kernel's row loads are aligned and vectorize


def pad_columns(t: torch.Tensor) -> torch.Tensor:
    return F.pad(t, (0, -t.shape[1] % COLUMN_PADDING))


class GPTQLinear(nn.Module):
    """One projection, or several over one input fused (`parts`: each checkpoint module's tensors loaded into
    its own columns of qweight, qzeros, scales and bias; its g_idx into its own row of g_idx)."""

    method = "gptq"
    optional_checkpoint_tensors = ("g_idx", "weight_g_idx")
    # compressed-tensors' names -> GPTQ's; its [N, ...] tensors are GPTQ's [..., N] transposed
    COMPRESSED_TENSORS_NAMES = {"weight_packed": "qweight", "weight_zero_point": "qzeros", "weight_scale": "scales",
                                "weight_g_idx": "g_idx"}

    def __init__(self, in_features: int, parts: list[Part], quant: GPTQConfig):
        super().__init__()
        pack = quant.pack_factor
        out_features = sum(p.rows for p in parts)
        if in_features % pack or any(p.rows % pack for p in parts):
            raise GPTQLoadError(f"GPTQ {quant.bits}-bit layers need in and out features divisible by {pack}, got "
                                f"{in_features} x {[p.rows for p in parts]}")
        self.in_features, self.out_features, self.parts, self.quant = in_features, out_features, parts, quant
        self.bits = quant.bits
        self.group_size = in_features if quant.group_size == -1 else quant.group_size
        groups = -(-in_features // self.group_size)
        # Scales stay fp16 as stored (fp32 in a float32 model): bf16 would lose 3 bits of every scale.
        scale_dtype = torch.float32 if torch.get_default_dtype() == torch.float32 else torch.float16
        i32 = dict(dtype=torch.int32)
        self.register_buffer("qweight", torch.zeros(in_features // pack, out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // pack, **i32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=scale_dtype))
        # One row per part. Without act-order a checkpoint may leave g_idx out: channel k is in group k // group_size.
        contiguous = (torch.arange(in_features) // self.group_size).to(torch.int32)
        self.register_buffer("g_idx", contiguous.repeat(len(parts), 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if any(p.bias for p in parts) else None
        # The kernel's layout, filled by finalize() (not checkpoint tensors, so not persistent).
        self.register_buffer("zeros", None, persistent=False)
        self.register_buffer("perm", None, persistent=False)
        self.separate_parts: nn.ModuleList | None = None  # see finalize()

    def checkpoint_tensors(self, part: int) -> list[str]:
        bias = ["bias"] if self.parts[part].bias else []
        if self.quant.checkpoint == "compressed-tensors":  # symmetric: no zero points stored
            zeros = [] if self.quant.sym else ["weight_zero_point"]
            return ["weight_packed", "weight_scale", "weight_shape", "weight_g_idx", *zeros, *bias]
        return ["qweight", "qzeros", "scales", "g_idx", *bias]

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor, part: int) -> None:
        """The loader's hook, for one part's tensor: into its columns (its row of g_idx)."""
        cols = part_rows(self.parts, part)
        if name == "weight_shape":
            expected = [cols.stop - cols.start, self.in_features]
            if tensor.tolist() != expected:
                raise ValueError(f"is {tensor.tolist()}, the model expects {expected}")
            return
        if name in self.COMPRESSED_TENSORS_NAMES:
            tensor = tensor if name == "weight_g_idx" else tensor.t()  # [N, ...] -> GPTQ's [..., N]
            name = self.COMPRESSED_TENSORS_NAMES[name]
        if self.quant.checkpoint == "awq" and name == "qweight":  # [K, N / 8] -> GPTQ's [K / 8, N]
            tensor = pack_int32_rows(unpack_awq_columns(tensor, self.bits), self.bits)
        elif self.quant.checkpoint == "awq" and name == "qzeros":  # AWQ's order -> column order
            tensor = pack_int32_rows(unpack_awq_columns(tensor, self.bits).t(), self.bits).t()
        if name == "g_idx":
            target = self.g_idx[part]
        elif name == "qzeros":  # packed along the output features
            target = self.qzeros[:, cols.start // self.quant.pack_factor:cols.stop // self.quant.pack_factor]
        elif name == "bias":
            target = self.bias[cols]
        else:
            target = getattr(self, name)[:, cols]
        copy_checked(target, tensor)

    def _group_order(self, g_idx: torch.Tensor, name: str) -> torch.Tensor:
        """The permutation that makes g_idx's groups contiguous (checked)."""
        g_idx = g_idx.long()
        groups = self.scales.shape[0]
        if g_idx.min() < 0 or g_idx.max() >= groups:
            raise GPTQLoadError(f"{name}.g_idx: group indices must be in [0, {groups}), got "
                                f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        perm = torch.argsort(g_idx, stable=True)
        contiguous = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        if not torch.equal(g_idx[perm], contiguous):
            raise GPTQLoadError(f"{name}.g_idx: every group must hold exactly group_size={self.group_size} input "
                                "channels (the last one the rest)")
        return perm

    @torch.no_grad()
    def finalize(self, names: list[str]) -> None:
        """From the checkpoint's layout to the kernel's; `names`: each part's checkpoint module, for errors.

        All parts are one kernel call when they share their act-order permutation (GPTQ gives layers over
        one input the same order). Parts quantized with different orders cannot share one gathered input:
        then each part runs as its own kernel call (`separate_parts`), and the log says so."""
        q = unpack_int32(self.qweight, self.bits, dim=0)
        zeros = unpack_int32(self.qzeros, self.bits, dim=1)
        if self.quant.zeros_offset_by_one:
            zeros = zeros + 1
        if self.quant.checkpoint == "compressed-tensors" and self.quant.sym:  # stored codes are q + 2^(bits - 1)
            zeros = torch.full_like(zeros, 1 << (self.bits - 1))
        perms = [self._group_order(g_idx, name) for g_idx, name in zip(self.g_idx, names)]
        if all(torch.equal(perm, perms[0]) for perm in perms[1:]):
            self._set_kernel_layout(q, zeros, self.scales, perms[0])
            return
        logger.info("%s: %d projections over the same input stay separate matmuls: their act-order permutations "
                    "(g_idx) differ", ", ".join(names), len(names))
        separate = []
        for i, (part, perm) in enumerate(zip(self.parts, perms)):
            cols = part_rows(self.parts, i)
            with torch.device("meta"):  # each tensor is replaced below
                layer = GPTQLinear(self.in_features, [part._replace(name=None)], self.quant)
            layer._set_kernel_layout(q[:, cols], zeros[:, cols], self.scales[:, cols], perm)
            layer.bias = None if self.bias is None else nn.Parameter(self.bias[cols].clone())
            separate.append(layer)
        self.separate_parts = nn.ModuleList(separate)
        del self.qweight, self.qzeros, self.scales, self.g_idx, self.bias

    def _set_kernel_layout(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor
                           ) -> None:
        """q [K, N] and zeros [groups, N] unpacked; perm: the input order that makes the groups contiguous."""
        if torch.equal(perm, torch.arange(self.in_features, device=perm.device)):
            self.perm = None
        else:
            self.perm = perm.to(torch.int32)
            q = q[perm]
        self.qweight = pad_columns(pack_int32_rows(q, self.bits))
        self.scales = pad_columns(scales)
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
        if self.quant.desc_act:
            self.perm = torch.randperm(self.in_features, generator=generator, device=self.scales.device).to(torch.int32)
        del self.qzeros, self.g_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.separate_parts is not None:
            return torch.cat([part(x) for part in self.separate_parts], dim=-1)
        return ops.quant_linear(x, self)
