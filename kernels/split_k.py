"""Split-K for the weight-streaming GEMMs (kernels/quant_linear/, kernels/fp8_linear.py).

At decode an [M, K] x [K, N] product has too few output tiles to keep every SM streaming weights, so K is
split too: program (n, m, k) sums its share of K. Every split stores its fp32 partial sum; the last split
of a tile to finish (an atomic counter per tile, reset by that split) adds the partials up in split order,
so the result does not depend on which split finished last, adds the bias and writes the output. One
launch per GEMM: no second reduce kernel, which at decode costs as much as a small GEMM's streaming.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import pdl

MAX_TILES = 1 << 16  # output tiles per launch that have a counter
_counters: dict[torch.device, torch.Tensor] = {}


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_for(tiles: int, K: int, block_k: int, waves: float, device: torch.device) -> int:
    """Splits along K so that about waves x SMs programs run (each with at least one K tile)."""
    return max(1, min(triton.cdiv(K, block_k), round(waves * _num_sms(device) / tiles)))


def tile_counters(device: torch.device) -> torch.Tensor:
    """int32 zeros, one per output tile; every launch leaves them at zero again."""
    if device not in _counters:
        _counters[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _counters[device]


@triton.jit
def last_to_arrive(count_ptr, index, arrivals):
    """Whether this program is the last of `arrivals` programs of the launch to count itself in at
    count_ptr[index]. Every program's stores before its call are visible to the last one (acq_rel; it reads
    them from L2, .cg), which resets the counter to zero for the next launch."""
    tl.debug_barrier()  # all of this program's stores are issued before its count is
    last = tl.atomic_add(count_ptr + index, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(count_ptr + index, 0)
    return last


@triton.jit
def store_output(acc, b_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """out[offs_m, offs_n] = acc (+ bias), in out's dtype."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def store_split_tile(acc, b_ptr, out_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, SPLIT_K,
                     HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """acc: this program's fp32 [rows, BLOCK_N] sum over its share of K (program_id(2) is its split)."""
    if SPLIT:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(part_ptr + (tl.program_id(2) * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if last_to_arrive(count_ptr, tile, SPLIT_K):
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):  # .cg: from L2, where the other splits' stores are
                total += tl.load(part_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
            store_output(total, b_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS)
    else:
        store_output(acc, b_ptr, out_ptr, offs_m, offs_n, M, N, HAS_BIAS)


def split_k_launch(kernel, x: torch.Tensor, weight_args: tuple, bias: torch.Tensor | None, N: int, rows: int,
                   config: dict, x_arg: torch.Tensor | None = None, **constexprs) -> torch.Tensor:
    """out [M, N] in x's dtype from kernel(x, *weight_args, bias, out, partials, counters, M, N, K, stride_xm,
    K_TILES, SPLIT_K, HAS_BIAS=, SPLIT=, USE_PDL= (kernels/pdl.py), **constexprs, **tiles), whose programs
    each cover `rows` rows and BLOCK_N columns of the output and K_TILES tiles of BLOCK_K along K. config: the
    tile constexprs, num_warps / num_stages and SPLIT_K (the splits wanted: fewer when K has fewer tiles).
    x_arg: what the kernel reads in x's place (x already transformed, e.g. gathered and packed), if not x;
    stride_xm is its row stride."""
    M, K = x.shape
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    cfg = dict(config)
    tiles_k = triton.cdiv(K, cfg["BLOCK_K"])
    k_tiles = triton.cdiv(tiles_k, cfg.pop("SPLIT_K"))
    split = triton.cdiv(tiles_k, k_tiles)  # no empty splits
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, rows), split)
    assert grid[0] * grid[1] <= MAX_TILES
    partials = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else out
    x_in = x if x_arg is None else x_arg
    kernel[grid](x_in, *weight_args, bias if bias is not None else x, out, partials,
                 tile_counters(x.device), M, N, K, x_in.stride(0), k_tiles, split, HAS_BIAS=bias is not None,
                 SPLIT=split > 1, **constexprs, **cfg, **pdl.launch_kwargs(x.device))
    return out
