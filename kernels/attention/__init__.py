"""Paged attention over a block-table KV cache: causal GQA attention for the flat batch, and the torch
reference of the K/V write (the Triton write is fused with RoPE in kernels/rope.py).

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]. Token j of a
sequence lives in block block_table[j // block_size] at offset j % block_size.

reference.py holds the torch references, decode.py the decode kernels (split context, reduce),
prefill.py the varlen prefill kernel, tiles.py the tile steps both share; paged_attention below launches
both for one flat batch.
"""

from __future__ import annotations

import torch
import triton

from kernels import pdl
from kernels.attention import decode, prefill  # modules: their tunables are read at each call, set there
from kernels.attention.decode import num_sms
from kernels.attention.reference import paged_attention_ref, write_kv_ref

__all__ = ["num_sms", "paged_attention", "paged_attention_ref", "write_kv_ref"]

_LOG2E = 1.4426950408889634


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, num_decodes: int = 0, max_query_len: int = 0, max_seq_len: int = 0, *,
                    new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of paged_attention_ref: the first num_decodes sequences go to the (split) decode kernel,
    the rest to the varlen prefill kernel. With num_decodes > 0 and max_seq_len > 0 the decode launch reads
    nothing from the device (CUDA-graph capturable); missing hints are computed from the tensors. Given
    new_k / new_v (in the cache's dtype, last dim contiguous), the prefill reads the new tokens' K / V from
    them, the cached ones through the pages."""
    T, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // kv_heads
    q = _last_dim_contiguous(q)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * _LOG2E
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))

    if num_decodes > 0:
        if max_seq_len <= 0:
            max_seq_len = int(seq_lens[:num_decodes].max())
        num_splits = decode.decode_splits(num_decodes, kv_heads, max_seq_len, q.device)
        split = num_splits > 1
        part_shape = (num_decodes * num_heads * num_splits) if split else 1
        part_m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        part_l = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        part_acc = torch.empty(part_shape * d_pad, dtype=torch.float32, device=q.device)
        decode._decode_kernel[(num_decodes, kv_heads, num_splits)](
            q, k_cache, v_cache, out, part_acc, part_m, part_l, query_start_loc, seq_lens,
            block_tables, qk_scale, num_splits, q.stride(0), q.stride(1), *cache_strides, out.stride(0),
            out.stride(1), block_tables.stride(0), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=decode.DECODE_BLOCK_N,
            MIN_PARTITION=decode.min_partition(), SPLIT=split, PRECISION=precision, num_warps=decode.DECODE_NUM_WARPS,
            num_stages=decode.DECODE_NUM_STAGES, **pdl.launch_kwargs(q.device))
        if split:
            decode._decode_reduce_kernel[(num_decodes, num_heads)](
                part_acc, part_m, part_l, out, query_start_loc, seq_lens, num_splits,
                out.stride(0), out.stride(1), HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=decode.DECODE_BLOCK_N,
                MIN_PARTITION=decode.min_partition(), SPLIT_CHUNK=decode.DECODE_SPLIT_CHUNK, num_warps=4,
                **pdl.launch_kwargs(q.device))

    num_prefills = num_seqs - num_decodes
    if num_prefills > 0:
        if max_query_len <= 0:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        cfg = dict(prefill._prefill_config(q.dtype, max_query_len))
        use_descriptors = cfg.pop("DESCRIPTORS")
        new_kv = new_k is not None and new_k.dtype == new_v.dtype == k_cache.dtype
        if new_kv:
            new_k, new_v = _last_dim_contiguous(new_k), _last_dim_contiguous(new_v)
            new_strides = (new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1))
            descriptors = prefill._new_kv_descriptors(new_k, new_v, cfg["BLOCK_N"]) if use_descriptors else None
            new_k_ptr, new_v_ptr = new_k, new_v  # pointer loads of the tile shared with cached keys
            if descriptors is not None:
                new_k, new_v = descriptors
        else:  # unread placeholders
            new_k, new_v, new_strides, descriptors = k_cache, v_cache, (0, 0, 0, 0), None
            new_k_ptr, new_v_ptr = k_cache, v_cache
        grid = (num_heads, num_prefills, triton.cdiv(max_query_len, cfg["BLOCK_M"]))
        prefill._prefill_kernel[grid](
            q, k_cache, v_cache, new_k, new_v, new_k_ptr, new_v_ptr, out, query_start_loc, seq_lens, block_tables,
            qk_scale, num_decodes,
            q.stride(0), q.stride(1), *cache_strides, *new_strides, out.stride(0), out.stride(1),
            block_tables.stride(0), GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
            PRECISION=precision, NEW_KV=new_kv, DESCRIPTORS=descriptors is not None, **cfg)
    return out
