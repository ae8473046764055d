"""Torch references of paged attention and of the K/V write (the Triton write is fused with RoPE in
kernels/rope.py): the definitions the decode and prefill kernels are tested against, and the CPU path.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]. Token j of a
sequence lives in block block_table[j // block_size] at offset j % block_size.
"""

from __future__ import annotations

import torch


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] go to flat cache slot slot_mapping[t] = block * block_size + offset (< 0: skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, num_decodes: int = 0, max_query_len: int = 0, max_seq_len: int = 0, *,
                        new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] holds the new tokens of B sequences (rows query_start_loc[b]:query_start_loc[b+1]).

    Sequence b has seq_lens[b] tokens in the cache (its new ones already written); its i-th new query
    sits at position seq_lens[b] - n_new + i and attends causally to cache positions 0..that position.
    Query head h reads KV head h // (Hq / Hkv). Softmax in fp32. Returns o [T, Hq, D].
    num_decodes (the first sequences have one query each), max_query_len and max_seq_len (upper bounds)
    only let the kernel size its launch without reading the device; they do not change the result. Nor do
    new_k / new_v [T, Hkv, D]: the K / V rows of the new tokens, the same values as their cache slots, which
    the kernel may read densely instead of through the pages.
    """
    out = torch.empty_like(q)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        qs, qe = starts[b], starts[b + 1]
        if qe == qs:
            continue
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), k.float()) * scale
        q_pos = torch.arange(seq_len - (qe - qs), seq_len, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(seq_len, device=q.device)[None, :] > q_pos, float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)
    return out
