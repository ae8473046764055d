"""FP8 linear layer: y = x @ (W_fp8 * scale)^T + bias, W float8_e4m3 [N, K] with one fp32 scale per output row.

Two GPU paths, picked by the number of rows (both measured in benchmarks/quant.py):
- few rows (decode): weight-only, a Triton GEMM that converts each fp8 tile to the activation dtype in
  registers, split along K like the GPTQ kernel, scales applied to the fp32 sum; for one row of a weight
  below 2^25 codes or with no more rows than columns (N <= K), a GEMV of fp32 multiply-adds (no tensor cores)
  that keeps one partial per (row, lane, word of 4 codes) and widens the codes with packed cvt instructions;
- many rows: Hopper's fp8 tensor cores through torch._scaled_mm, activations quantized per row
  (dynamic, scale = amax / 448), so the product is rowwise-scaled fp8 x fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import activation
from kernels.activation import load_x
from kernels.pdl import wait_for_predecessor
from kernels.split_k import split_for, split_k_launch, store_split_tile

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALED_MM_MIN_ROWS = 128  # from here on (on sm_89+): fp8 x fp8 tensor cores
GEMV_MAX_WEIGHTS = 1 << 25  # one row of a smaller weight: the GEMV kernel (H200 sweep, RESULTS.md)


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric float8_e4m3fn quantization of w [N, K]: (q, scale [N] fp32), w ~ q * scale[:, None]."""
    scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: dequantize, matmul in float32, add bias."""
    y = x.float() @ (weight.float() * scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _fp8_matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, K_TILES, SPLIT_K,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Weight-only fp8: a [BLOCK_M, BLOCK_N] output tile over K_TILES tiles of K, W^T tiles read from the
    row-major [N, K] fp8 weight and widened to x's dtype (exact), the row scales applied to the fp32 sum."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    wait_for_predecessor(USE_PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(K_TILES):
        offs_k = (tl.program_id(2) * K_TILES + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w = w.to(tl.float32).to(x_ptr.dtype.element_ty)  # e4m3 values are exact in fp16 / bf16 / fp32
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    store_split_tile(acc, b_ptr, out_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, SPLIT_K, HAS_BIAS, SPLIT)


@triton.jit
def _fp8_w_tile(w_ptr, K, k0, offs_n, mask_n, offs_v, VEC: tl.constexpr):
    """W of the K tile at k0, [BLOCK_N, BLOCK_K // VEC, VEC // 4] as stored, in 32-bit words of 4 codes (VEC
    contiguous bytes a thread); masked at K only (splits start at tile bounds)."""
    offs_w = k0 // 4 + offs_v[:, None] * (VEC // 4) + tl.arange(0, VEC // 4)[None, :]
    return tl.load(w_ptr + offs_n[:, None, None] * (K // 4) + offs_w[None, :, :],
                   mask=mask_n[:, None, None] & (offs_w < K // 4)[None], other=0)


@triton.jit
def _fp8_x_tile(x_ptr, m, stride_xm, K, k0, offs_v, VEC: tl.constexpr, SILU_MUL: tl.constexpr):
    """x [BLOCK_K // VEC, VEC] of the K tile at k0, masked at K (SILU_MUL: SiLU(gate) * up, load_x)."""
    offs_k = k0 + offs_v[:, None] * VEC + tl.arange(0, VEC)[None, :]
    return load_x(x_ptr + m * stride_xm + offs_k, offs_k < K, K, SILU_MUL)


@triton.jit
def _e4m3_byte_to_f32(words, byte: tl.constexpr):
    """Code number `byte` (little-endian) of each int32 word of 4 float8_e4m3fn codes, as fp32."""
    code = ((words >> (8 * byte)) & 0xFF).to(tl.uint8)
    return code.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _fp8_gemv_mac(acc, w, x, PACKED_CVT: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K // VEC, VEC // 4] += the 4 products of each word of codes with its 4 x, in the
    thread's registers (no shuffles). PACKED_CVT (sm_89+, inline PTX): the word's codes widened by two
    cvt.rn.f16x2.e4m3x2 and 4 f16 -> f32 in place (Triton's own fp8 conversion takes the bytes of a load
    apart and packs them again: about 2 byte permutes a code in SASS, more than the multiply-adds); without
    it (Triton's interpreter runs no PTX) each byte is shifted out and converted by Triton."""
    x = tl.reshape(x.to(tl.float32), [x.shape[0], x.shape[1] // 4, 2, 2])  # (.., word, byte // 2, byte % 2)
    x_even, x_odd = tl.split(x)
    x0, x2 = tl.split(x_even)
    x1, x3 = tl.split(x_odd)
    if PACKED_CVT:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 c01, c23, h0, h1, h2, h3; .reg .b32 f01, f23; .reg .f32 w0, w1, w2, w3, s;\n"
            "mov.b32 {c01, c23}, $1;\n"
            "cvt.rn.f16x2.e4m3x2 f01, c01;\n"
            "cvt.rn.f16x2.e4m3x2 f23, c23;\n"
            "mov.b32 {h0, h1}, f01;\n"
            "mov.b32 {h2, h3}, f23;\n"
            "cvt.f32.f16 w0, h0; cvt.f32.f16 w1, h1; cvt.f32.f16 w2, h2; cvt.f32.f16 w3, h3;\n"
            "fma.rn.f32 s, w0, $2, $6; fma.rn.f32 s, w1, $3, s; fma.rn.f32 s, w2, $4, s;\n"
            "fma.rn.f32 $0, w3, $5, s; }",
            "=f,r,f,f,f,f,f", [w, x0[None], x1[None], x2[None], x3[None], acc], dtype=tl.float32, is_pure=True,
            pack=1)
    acc += _e4m3_byte_to_f32(w, 0) * x0[None]
    acc += _e4m3_byte_to_f32(w, 1) * x1[None]
    acc += _e4m3_byte_to_f32(w, 2) * x2[None]
    return acc + _e4m3_byte_to_f32(w, 3) * x3[None]


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, K_TILES,
                     SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SILU_MUL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, PACKED_CVT: tl.constexpr,
                     USE_PDL: tl.constexpr):
    """Weight-only fp8, one row of x (program_id(1)), W read as int32 words [N, K / 4] (K % 4 == 0): each
    thread streams VEC contiguous bytes of each of the tile's W rows (8: its 8 x are one 16-byte load of
    bf16); BLOCK_K = VEC x 32 x num_warps spreads every warp along K, so each thread holds all BLOCK_N rows
    for one x vector. One fp32 partial per (row, lane, word): the accumulator is BLOCK_N x BLOCK_K / 4 (one per
    K element spilled registers in an earlier version); the partials are summed once at the end. The
    next tile's loads are issued before this tile's arithmetic, and no tile past this split's is read.
    SILU_MUL: x is the gate half of [gate | up] rows, multiplied as SiLU(gate) * up (kernels/activation.py)."""
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_v = tl.arange(0, BLOCK_K // VEC)
    k0 = tl.program_id(2) * K_TILES * BLOCK_K
    n_tiles = tl.minimum(K_TILES, tl.cdiv(K - k0, BLOCK_K))  # the last split may have fewer
    w = _fp8_w_tile(w_ptr, K, k0, offs_n, mask_n, offs_v, VEC)
    wait_for_predecessor(USE_PDL)  # the first W tile is in flight before x's writer has finished
    x = _fp8_x_tile(x_ptr, m, stride_xm, K, k0, offs_v, VEC, SILU_MUL)
    acc = tl.zeros((BLOCK_N, BLOCK_K // VEC, VEC // 4), dtype=tl.float32)
    for _ in range(1, n_tiles):
        k0 += BLOCK_K
        next_w = _fp8_w_tile(w_ptr, K, k0, offs_n, mask_n, offs_v, VEC)
        next_x = _fp8_x_tile(x_ptr, m, stride_xm, K, k0, offs_v, VEC, SILU_MUL)
        acc = _fp8_gemv_mac(acc, w, x, PACKED_CVT)
        w, x = next_w, next_x
    acc = _fp8_gemv_mac(acc, w, x, PACKED_CVT)
    y = tl.sum(tl.sum(acc, axis=2), axis=1) * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    store_split_tile(y[None, :], b_ptr, out_ptr, part_ptr, count_ptr, m + tl.arange(0, 1), offs_n, M, N, SPLIT_K,
                     HAS_BIAS, SPLIT)


GEMV_VEC = 8  # bytes of a W row a thread loads per tile in _fp8_gemv_kernel (see its docstring)


def gemv_config(N: int, K: int, block_n: int, num_warps: int, waves: float, device: torch.device,
                vec: int = GEMV_VEC) -> dict:
    """A config for _fp8_gemv_kernel: BLOCK_K = vec bytes x 32 lanes x num_warps (every warp along K),
    split along K for about `waves` programs per SM."""
    bk = vec * 32 * num_warps
    return dict(kind="gemv", BLOCK_N=block_n, BLOCK_K=bk, VEC=vec, num_warps=num_warps,
                num_stages=1, SPLIT_K=split_for(triton.cdiv(N, block_n), K, bk, waves, device))


def weight_only_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Kernel, tile sizes and split-K for the weight-only path: enough programs to fill every SM a few times.
    The H200 sweep's best at one row (benchmarks/quant.py, RESULTS.md session 15), us, against the tl.dot kernel:
    below 2^25 codes the GEMV, 4 rows of W a program, 8 bytes a thread, 4 warps along K, no split (3072 x 8728
    11.5 against 12.9, 3072 x 3072 4.9 against 6.8); from there, no more rows than columns (N <= K: the 7B's
    down 12288 x 3072, FalconMamba's out_proj 8192 x 4096), the GEMV with 2 rows a program and 16 bytes a thread (13.2
    against 17.0, 12.4 against 15.6); wider weights (the 7B's gate+up, FalconMamba's in_proj) the tl.dot kernel,
    not split at one row (FalconMamba's in_proj 20.7 against 24.8 split in two)."""
    if M == 1 and K % 4 == 0:
        if K * N < GEMV_MAX_WEIGHTS:
            return gemv_config(N, K, block_n=4, num_warps=4, waves=4, device=device)
        if K >= N:
            return gemv_config(N, K, block_n=2, num_warps=4, waves=4, device=device, vec=16)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    bn, bk, warps, stages, waves = (64, 128, 4, 4, 2 if M == 1 else 4) if M <= 64 else (128, 64, 8, 3, 1)
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = split_for(tiles, K, bk, waves, device)
    return dict(kind="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)


def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           config: dict | None = None, silu_mul: bool = False) -> torch.Tensor:
    """fp8_linear_ref by the weight-only kernels (config: kernel and tiles, default weight_only_config).
    silu_mul: x is [M, 2K] = [gate | up] and the product is of SiLU(gate) * up: fp8_linear_ref(silu_mul_ref(gate,
    up), ...). The GEMV computes it as it loads x (one launch); the tl.dot kernel after silu_mul's launch, since
    each of its programs would recompute a [16, K] tile of it for one row (41.1 against 15.5 us at the 7B's
    down, RESULTS.md session 13)."""
    x = x.contiguous()
    K, N = x.shape[1] // (2 if silu_mul else 1), weight.shape[0]
    cfg = dict(config or weight_only_config(x.shape[0], N, K, x.device))
    kind = cfg.pop("kind", "gemm")
    if kind == "gemv":
        if K % 4:
            raise ValueError(f"the gemv kernel reads W as 32-bit words: K = {K} is not a multiple of 4")
        if silu_mul:
            x = x[:, :K]  # the gates, a view: each row's up follows its gate (row stride 2K)
        return split_k_launch(_fp8_gemv_kernel, x, (weight.view(torch.int32), scale), bias, N, 1, cfg,
                              SILU_MUL=silu_mul, PACKED_CVT=x.is_cuda and _has_fp8_tensor_cores(x.device))
    if silu_mul:
        x = activation.silu_mul(*x.chunk(2, dim=-1))
    return split_k_launch(_fp8_matmul_kernel, x, (weight, scale), bias, N, cfg["BLOCK_M"], cfg,
                          IEEE=x.dtype == torch.float32)


def quantize_fp8_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations per row: (x_fp8 [M, K], scale [M, 1] fp32), the layout torch._scaled_mm takes."""
    q, scale = quantize_fp8_weight(x)
    return q, scale[:, None]


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    q = tl.clamp(x / scale, -448.0, 448.0)
    tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of quantize_fp8_rows_ref: one launch instead of five elementwise passes."""
    M, K = x.shape
    q = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if M:
        block = triton.next_power_of_2(K)
        _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return q, scale


def fp8_scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    """fp8 x fp8 on tensor cores: x quantized per row on the fly, one scale per row of x and of W."""
    x_fp8, x_scale = quantize_fp8_rows(x) if x.is_cuda else quantize_fp8_rows_ref(x)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=out_dtype)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
    """GPU version of fp8_linear_ref: weight-only for few rows, fp8 tensor cores for many (half-precision x).
    _scaled_mm needs K and N divisible by 16: the last N % 16 rows of W (a fused projection's) go weight-only."""
    (M, K), N = x.shape, weight.shape[0]
    if M < SCALED_MM_MIN_ROWS or x.dtype == torch.float32 or K % 16 or N < 16 or not _has_fp8_tensor_cores(x.device):
        return fp8_weight_only_linear(x, weight, scale, bias)
    n16 = N - N % 16
    y = fp8_scaled_mm_linear(x, weight[:n16], scale[:n16], bias[:n16] if bias is not None else None)
    if n16 == N:
        return y
    rest = fp8_weight_only_linear(x, weight[n16:], scale[n16:], bias[n16:] if bias is not None else None)
    return torch.cat([y, rest], dim=1)
