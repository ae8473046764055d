"""GPTQ W4A16 / W8A16 linear layer: y = x @ dequantize(W)^T + bias, the integers dequantized in registers.

Runtime layout (engine/quantization/gptq.py builds it from a checkpoint):
    qweight [K / pack, N] int32, pack = 32 / bits: input channel k of output n sits in bits
            [(k % pack) * bits, (k % pack + 1) * bits) of qweight[k // pack, n]
    scales  [G, N] and zeros [G, N] (int16): input channel k belongs to group k // group_size
    perm    [K] or None: act-order checkpoints are reordered at load so that groups are contiguous;
            then the input is gathered first, x[:, perm]
    W[n, k] = scales[k // group_size, n] * (q[k, n] - zeros[k // group_size, n])

Decode-sized inputs (up to a few hundred rows) run one Triton GEMM that reads each packed weight once,
split along K so that even one row keeps every SM streaming (partial sums reduced by a second small
kernel); long prefills dequantize each weight into a 16-bit scratch and use cuBLAS, which costs a few
percent there and is far faster than a hand-written GEMM at those sizes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DEQUANT_MATMUL_MIN_ROWS = 1024  # from here on: dequantize to 16 bits, then cuBLAS


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """W^T [K, N_w] in float32 from the runtime layout above (N_w: the stored columns, padding included)."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits
    q = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [K / pack, pack, N]
    q = q.reshape(-1, qweight.shape[1])
    group = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros[group].int()).float() * scales[group].float()


def gptq_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                    out_features: int | None = None) -> torch.Tensor:
    """x [M, K] -> [M, out_features] in x's dtype: gather by perm, dequantize, matmul in float32, add bias.
    out_features: the real columns when the stored ones are padded (default: all)."""
    if perm is not None:
        x = x[:, perm]
    N = out_features or qweight.shape[1]
    y = x.float() @ dequantize_ref(qweight, scales, zeros, bits, group_size)[:, :N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, K, N_W, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, DTYPE: tl.constexpr):
    """W^T[k0 : k0 + BLOCK_K, offs_n] in DTYPE. Each packed word is loaded once and split by shifts (its
    values are consecutive input channels); the tile lies in one group (GROUP is a multiple of BLOCK_K).
    N_W is the weights' row stride: a multiple of 16 when the layer pads its columns, so loads vectorize."""
    PACK: tl.constexpr = 32 // BITS
    rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    mask_n = offs_n < N_W
    packed = tl.load(qw_ptr + rows[:, None] * N_W + offs_n[None, :],
                     mask=(rows < K // PACK)[:, None] & mask_n[None, :], other=0)
    shifts = tl.arange(0, PACK) * BITS
    q = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BLOCK_K / PACK, PACK, BLOCK_N]
    q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # channel k0 + i * PACK + j
    g = k0 // GROUP
    in_range = mask_n & (offs_n * 0 + k0 < K)  # a tile past K (last split) reads no group
    scale = tl.load(s_ptr + g * N_W + offs_n, mask=in_range, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g * N_W + offs_n, mask=in_range, other=0).to(tl.int32)
    return ((q - zero[None, :]).to(tl.float32) * scale[None, :]).to(DTYPE)


@triton.jit
def _gptq_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, N_W, K, stride_xm,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, K_TILES,
                        IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over K_TILES tiles of K. SPLIT (split along K): fp32 partial sums
    go to out[pid_k] ([splits, M, N_W]), bias and the cast come in the reduce kernel."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_TILES * BLOCK_K
    for i in range(K_TILES):
        k0 = k_begin + i * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, K, N_W, BLOCK_K, BLOCK_N, BITS, GROUP,
                          x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    store_tile(acc, b_ptr, out_ptr, offs_m, offs_n, M, N, N_W, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def store_tile(acc, b_ptr, out_ptr, offs_m, offs_n, M, N, N_W, pid_k, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """The output tile: with bias into out [M, N], or as fp32 partial sums into out[pid_k] ([splits, M, N_W])."""
    mask_m = offs_m < M
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N_W + offs_m[:, None] * N_W + offs_n[None, :], acc,
                 mask=mask_m[:, None] & (offs_n < N_W)[None, :])
    else:
        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _split_k_reduce_kernel(p_ptr, b_ptr, out_ptr, M, N, N_W, SPLIT_K, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, :N] = sum over splits of partial[s, m, :N] (+ bias), in out's dtype."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(p_ptr + (s * M + m) * N_W + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gptq_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, K, N_W, BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W^T [K, N_W] in w's dtype."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, K, N_W, BLOCK_K, BLOCK_N, BITS, GROUP,
                      w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs_k[:, None] * N_W + offs_n[None, :], w,
             mask=(offs_k < K)[:, None] & (offs_n < N_W)[None, :])


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def matmul_config(M: int, N: int, K: int, group_size: int, device: torch.device) -> dict:
    """Tile sizes and split-K for an [M, K] x [K, N] product: enough programs to fill every SM a few times."""
    if M <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif M <= 32:
        bm, bn, bk, warps, stages = 32, 64, 128, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if group_size < K:  # a K tile must not straddle two groups
        bk = min(bk, group_size & -group_size)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_tiles = triton.cdiv(K, bk)
    split = max(1, min(k_tiles, 16, (4 * _num_sms(device)) // tiles))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)


def split_k_matmul(kernel, x: torch.Tensor, weights: tuple, bias: torch.Tensor | None, N: int, N_W: int,
                   config: dict, **constexprs) -> torch.Tensor:
    """Launches a dequantizing matmul kernel with the signature of _gptq_matmul_kernel (x, *weights, bias,
    out, M, N, N_W, K, stride_xm, ...) and, when split along K, the reduce kernel. N: output columns;
    N_W: the weights' row stride (N, or N padded)."""
    M, K = x.shape
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    cfg = dict(config)
    split = cfg.pop("SPLIT_K")
    k_tiles = triton.cdiv(triton.cdiv(K, cfg["BLOCK_K"]), split)
    split = triton.cdiv(triton.cdiv(K, cfg["BLOCK_K"]), k_tiles)  # no empty splits
    partial = out if split == 1 else torch.empty(split, M, N_W, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
    b = bias if bias is not None else x
    kernel[grid](x, *weights, b, partial, M, N, N_W, K, x.stride(0), HAS_BIAS=bias is not None, SPLIT=split > 1,
                 K_TILES=k_tiles, IEEE=x.dtype == torch.float32, **constexprs, **cfg)
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        _split_k_reduce_kernel[(M, triton.cdiv(N, block))](partial, b, out, M, N, N_W, split,
                                                          HAS_BIAS=bias is not None, BLOCK=block)
    return out


def gptq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Triton version of dequantize_ref, in `dtype`."""
    K, N_W = qweight.shape[0] * (32 // bits), qweight.shape[1]
    w = torch.empty(K, N_W, device=qweight.device, dtype=dtype)
    bk = min(64, group_size & -group_size)
    _gptq_dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(N_W, 128))](qweight, scales, zeros, w, K, N_W, BITS=bits,
                                                                       GROUP=group_size, BLOCK_K=bk, BLOCK_N=128)
    return w


def gptq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                out_features: int | None = None, config: dict | None = None) -> torch.Tensor:
    """Triton version of gptq_linear_ref (config: tile sizes, for benchmarks; default matmul_config)."""
    if perm is not None:
        x = x.index_select(1, perm)
    x = x.contiguous()
    M, K = x.shape
    N_W = qweight.shape[1]
    N = out_features or N_W
    if M >= DEQUANT_MATMUL_MIN_ROWS and config is None:
        w = gptq_dequantize(qweight, scales, zeros, bits, group_size, x.dtype)[:, :N]
        return torch.addmm(bias, x, w) if bias is not None else x @ w
    config = config or matmul_config(M, N, K, group_size, x.device)
    return split_k_matmul(_gptq_matmul_kernel, x, (qweight, scales, zeros), bias, N, N_W, config, BITS=bits,
                          GROUP=group_size)
