"""W^T dequantized into a 16-bit scratch (kind "dequant": from DEQUANT_MATMUL_MIN_ROWS rows), for cuBLAS to
multiply. Reference: reference.py dequantize_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_linear.codes import TWO_23, _code


@triton.jit
def _gptq_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, K, N_W, BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W^T [K, N_W] in w's dtype; each stored row of channels k = pack r + j is written for every j."""
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PACK
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K // PACK)[:, None] & (offs_n < N_W)[None, :]
    words = tl.load(qw_ptr + rows[:, None] * N_W + offs_n[None, :], mask=mask, other=0)
    g = (rows * PACK) // GROUP
    scale = tl.load(s_ptr + g[:, None] * N_W + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g[:, None] * N_W + offs_n[None, :], mask=mask, other=0).to(tl.float32) + TWO_23
    for j in tl.static_range(PACK):
        code, _ = _code(words, words, j, BITS, False)
        w = (code - zero) * scale
        tl.store(w_ptr + (rows * PACK + j)[:, None] * N_W + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def gptq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Triton version of dequantize_ref, in `dtype`."""
    K, N_W = qweight.shape[0] * (32 // bits), qweight.shape[1]
    w = torch.empty(K, N_W, device=qweight.device, dtype=dtype)
    bk = 16 * (32 // bits)
    _gptq_dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(N_W, 128))](qweight, scales, zeros, w, K, N_W, BITS=bits,
                                                                       GROUP=group_size, BLOCK_K=bk, BLOCK_N=128)
    return w
