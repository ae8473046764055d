"""The device tensors behind the caches: per Mamba layer a conv-state and an SSM-state pool indexed by
state slot, per attention layer paged K and V indexed by block. Allocated once; the scheduler's
CacheManager decides which slot and blocks each sequence owns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import FalconH1Config, ModelConfig


@dataclass
class LayerCache:
    conv_state: torch.Tensor  # [num_slots, conv_dim, K-1], model dtype
    ssm_state: torch.Tensor  # [num_slots, H, P, N] (Mamba2) or [num_slots, d_inner, N] (Mamba1)
    k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor | None = None


def state_slot_bytes(cfg: ModelConfig, dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Bytes of one sequence's conv + SSM state over all layers."""
    conv = torch.Size(cfg.conv_state_shape).numel() * dtype.itemsize
    ssm = torch.Size(cfg.ssm_state_shape).numel() * state_dtype.itemsize
    return cfg.num_mamba_layers * (conv + ssm)


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all attention layers (0 for pure SSMs)."""
    if not isinstance(cfg, FalconH1Config):
        return 0
    return cfg.num_attention_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


def allocate_layer_caches(cfg: ModelConfig, num_slots: int, num_blocks: int, block_size: int,
                          dtype: torch.dtype, state_dtype: torch.dtype, device: torch.device) -> list[LayerCache]:
    caches = []
    for _ in range(cfg.num_hidden_layers):
        cache = LayerCache(
            conv_state=torch.zeros(num_slots, *cfg.conv_state_shape, dtype=dtype, device=device),
            ssm_state=torch.zeros(num_slots, *cfg.ssm_state_shape, dtype=state_dtype, device=device),
        )
        if isinstance(cfg, FalconH1Config):
            shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
            cache.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            cache.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        caches.append(cache)
    return caches
