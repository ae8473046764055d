"""Tensor-parallel layers and the slicing of checkpoint tensors into per-rank shards.

Column- and row-parallel linears are plain linears holding their rank's rows (output features) or
columns (input features): the model files say which, and sum row-parallel outputs with one all-reduce
where they meet (Falcon-H1 adds attention and Mamba before reducing once). What needs more than a slice
lives here: the vocabulary-parallel embedding and head, and Mamba2's gated norm when one group's
channels span several ranks.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.distributed.group import SINGLE, TensorParallel


def rank_units(count: int, tp: TensorParallel) -> range:
    """The units (heads, groups, channels) of `count` that this rank holds: count / size of them or, when
    there are fewer units than ranks (KV heads, Mamba groups), the one its share of the heads uses."""
    if count >= tp.size:
        per = count // tp.size
        return range(tp.rank * per, (tp.rank + 1) * per)
    unit = tp.rank * count // tp.size
    return range(unit, unit + 1)


def local_count(count: int, tp: TensorParallel) -> int:
    return len(rank_units(count, tp))


def shard(tensor: torch.Tensor, tp: TensorParallel, segments: list[tuple[int, int]], dim: int = 0) -> torch.Tensor:
    """This rank's part of `tensor` along `dim`, which is laid out as consecutive segments of
    (units, rows per unit), e.g. Mamba2's in_proj rows [z | x | B | C | dt] by head, head, group, group, head."""
    if tp.size == 1:
        return tensor
    index, offset = [], 0
    for count, unit in segments:
        units = rank_units(count, tp)
        index.append(torch.arange(units.start * unit, units.stop * unit) + offset)
        offset += count * unit
    if offset != tensor.shape[dim]:
        raise ValueError(f"cannot shard a tensor of shape {tuple(tensor.shape)}: dim {dim} should have {offset} rows")
    return tensor.index_select(dim, torch.cat(index).to(tensor.device))


ROW_PARALLEL_BIAS = "row-parallel bias"  # added once, by rank 0, before the all-reduce: zeros elsewhere

Layout = dict[str, "tuple[int, list[tuple[int, int]]] | str"]  # tensor name (per layer) -> (dim, segments)


def shard_checkpoint_tensor(layout: Layout, name: str, tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's shard of a checkpoint tensor, by the model's layout; names not in it are replicated.
    Layer tensors are looked up without their `...layers.<i>.` prefix."""
    rule = layout.get(re.sub(r"^.*?layers\.\d+\.", "", name))
    if tp.size == 1 or rule is None:
        return tensor
    if rule == ROW_PARALLEL_BIAS:
        return tensor if tp.rank == 0 else torch.zeros_like(tensor)
    dim, segments = rule
    return shard(tensor, tp, segments, dim)


class VocabParallelEmbedding(nn.Module):
    """Embedding over `num_rows` vocabulary rows (padded so the ranks split them evenly; the whole
    checkpoint table at size 1). Each rank looks up the ids in its range and zeros the others; the
    all-reduce gives every row from the rank that holds it."""

    def __init__(self, vocab_size: int, num_rows: int, dim: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        rows = vocab_size if tp.size == 1 else num_rows // tp.size
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.first_row = tp.rank * rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first_row
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(h)


class LMHead(nn.Module):
    """logits = h W^T over the real vocabulary. W has `num_rows` rows, padded past the vocabulary (never
    sampled) so the matmul's output rows stay 256-byte aligned and the ranks split them evenly; each rank
    computes its rows' logits and the all-gather joins them; the padding columns are sliced off."""

    def __init__(self, hidden_size: int, vocab_size: int, num_rows: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.weight = nn.Parameter(torch.empty(num_rows // tp.size, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, d] -> fp32 logits [S, vocab_size]."""
        return self.tp.all_gather_columns(ops.lm_head(hidden, self.weight))[:, : self.vocab_size].float()


def gated_rms_norm_across_ranks(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                                ranks_per_group: int, norm_before_gate: bool, tp: TensorParallel) -> torch.Tensor:
    """Mamba2's gated group RMSNorm (kernels/norm.py gated_rms_norm_ref) when each rank holds part of one
    group (n_groups < size): the group's sum of squares adds up over its ranks in one all-reduce of a
    [T, groups] tensor, each rank filling its group's column."""
    T, D = y.shape
    h = y.float()
    gate = F.silu(z.float())
    if not norm_before_gate:
        h = h * gate
    group = tp.rank // ranks_per_group
    sums = h.new_zeros(T, tp.size // ranks_per_group)
    sums[:, group] = h.pow(2).sum(-1)
    mean_square = tp.all_reduce(sums)[:, group] / (D * ranks_per_group)
    h = h * torch.rsqrt(mean_square + eps)[:, None] * weight.float()
    if norm_before_gate:
        h = h * gate
    return h.to(y.dtype)
