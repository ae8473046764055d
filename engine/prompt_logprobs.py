"""Scoring prompt tokens: the logits of prompt positions, ROWS_PER_BLOCK rows at a time, reduced at once to
what a request asks for (the next prompt token's logprob and rank, and the top-k), so a long prompt never
holds a [prompt_len, vocab] tensor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ROWS_PER_BLOCK = 256  # logits rows alive at once; the memory plan profiles one such block


@dataclass
class PromptScores:
    """Per scored position p: the logprob and rank (1 = most likely) of token p+1, and the top-k."""

    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def score_rows(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
               targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """hidden [R, d] and targets [R] -> (target logprob [R], target rank [R], top-k ids [R, k], top-k logprobs)."""
    chosen, ranks, top_ids, top_lps = [], [], [], []
    for start in range(0, hidden.shape[0], ROWS_PER_BLOCK):
        logprobs = compute_logits(hidden[start:start + ROWS_PER_BLOCK]).log_softmax(-1)
        target_lp = logprobs.gather(1, targets[start:start + ROWS_PER_BLOCK, None])
        chosen.append(target_lp[:, 0])
        ranks.append((logprobs > target_lp).sum(-1) + 1)
        top = logprobs.topk(k, dim=-1)
        top_ids.append(top.indices)
        top_lps.append(top.values)
    return tuple(torch.cat(parts) for parts in (chosen, ranks, top_ids, top_lps))


def split_scores(scores: tuple[torch.Tensor, ...], spans: list[tuple[int, int, int]]) -> list[PromptScores]:
    """One PromptScores per (first row, number of rows, k) span, copied to the host once."""
    chosen, ranks, top_ids, top_lps = (t.tolist() for t in scores)
    return [PromptScores(chosen[a:a + n], ranks[a:a + n], [row[:k] for row in top_ids[a:a + n]],
                         [row[:k] for row in top_lps[a:a + n]]) for a, n, k in spans]
