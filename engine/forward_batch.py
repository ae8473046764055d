"""The flat batch of one forward step: new tokens of all scheduled sequences, decodes first."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions
    query_start_loc: torch.Tensor  # [B+1] int32, cu_seqlens of the new tokens
    seq_lens: torch.Tensor  # [B] int32, tokens in the cache after this step (for attention)
    state_slots: torch.Tensor  # [B] int32, row in the SSM/conv pools (< 0: padding)
    has_initial_state: torch.Tensor  # [B] bool, false on a sequence's first chunk
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of each new token (< 0: padding)
    logits_indices: torch.Tensor  # [S] int64, rows whose logits are needed
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    max_query_len: int  # host-side bounds, so kernels can size grids without a device sync
    max_seq_len: int
    lora_slots: torch.Tensor | None = None  # [T] int32, each token's adapter slot (< 0: none); None: no adapters

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.state_slots.shape[0]

    @property
    def num_prefill_seqs(self) -> int:
        return self.num_seqs - self.num_decodes

    # The decode and prefill parts of the per-sequence tensors, made once a step, not in every layer.
    @cached_property
    def decode_state_slots(self) -> torch.Tensor:
        return self.state_slots[: self.num_decodes]

    @cached_property
    def prefill_state_slots(self) -> torch.Tensor:
        return self.state_slots[self.num_decodes:]

    @cached_property
    def prefill_has_initial_state(self) -> torch.Tensor:
        return self.has_initial_state[self.num_decodes:]

    @cached_property
    def prefill_query_start_loc(self) -> torch.Tensor:
        """cu_seqlens of the prefill sequences, relative to the first prefill token (once a step, not per layer)."""
        return self.query_start_loc[self.num_decodes:] - self.num_decodes
