"""Applying a packed token bitmask to logits (what llguidance.torch.apply_token_bitmask_inplace computes;
that one is torch.compile'd, which CPU-only servers and tests should not pay for)."""

from __future__ import annotations

import torch


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """In place: logits[rows[j], t] = -inf unless bit t % 32 of bitmask[j, t // 32] is set.
    The mask covers at least the logits' vocabulary (GrammarCompiler sizes it so)."""
    V = logits.shape[1]
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :V].bool()
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
