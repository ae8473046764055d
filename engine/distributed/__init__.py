"""Tensor parallelism (DESIGN.md): the process group, the sharded layers, and the worker processes."""

from engine.distributed.group import SINGLE, TensorParallel
from engine.distributed.layers import (
    ROW_PARALLEL_BIAS,
    LMHead,
    VocabParallelEmbedding,
    gated_rms_norm_across_ranks,
    local_count,
    shard_checkpoint_tensor,
)

__all__ = ["ROW_PARALLEL_BIAS", "SINGLE", "LMHead", "TensorParallel", "VocabParallelEmbedding",
           "gated_rms_norm_across_ranks", "local_count", "shard_checkpoint_tensor"]
