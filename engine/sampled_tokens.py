"""A decode step's input tokens when they are the previous step's samples, still on the device (async
scheduling, LLMEngine.step): the host launches step N+1 before step N's tokens reach it.

The host stages placeholders (Sequence.PENDING_TOKEN) and, per row, which sampled row holds its token
and which tokens would end it (eos, stop token ids). On the device each row takes its token, and a row
whose token ends its sequence becomes padding (state slot PAD_SLOT, KV slot -1, seq_len 0): that
sequence is done, and its extra step must write neither its state (a prefix-cache checkpoint once it
finishes) nor its KV cache."""

from __future__ import annotations

import torch

from engine.sampler import small_tensor
from kernels import PAD_SLOT


class SampledTokens:
    def __init__(self, tokens: torch.Tensor, rows: list[int], stop_ids: list[list[int]]):
        """tokens: the previous step's sampled tokens [M] (device); rows[i]: row i's token in them;
        stop_ids[i]: the tokens that end row i's sequence if sampled."""
        self.tokens = tokens
        n, width = len(rows), max(map(len, stop_ids), default=0)
        # One host-to-device copy: the rows, then each row's stop ids padded with -1 (never a token).
        flat = small_tensor(rows + [t for ids in stop_ids for t in ids + [-1] * (width - len(ids))], torch.long,
                            tokens.device)
        self.rows, self.stop_ids = flat[:n], flat[n:].view(n, width)

    def write_inputs(self, input_ids: torch.Tensor, state_slots: torch.Tensor, slot_mapping: torch.Tensor,
                     seq_lens: torch.Tensor) -> None:
        """Fills the rows' input tokens in place and turns rows whose token ends them into padding."""
        tokens = self.tokens.index_select(0, self.rows)
        input_ids.copy_(tokens)
        if self.stop_ids.shape[1]:
            done = (tokens[:, None] == self.stop_ids).any(1)
            state_slots.masked_fill_(done, PAD_SLOT)
            slot_mapping.masked_fill_(done, -1)
            seq_lens.masked_fill_(done, 0)
