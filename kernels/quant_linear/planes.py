"""The planes GEMM of 2 to 128 rows on tensor cores (kinds "planes" and, transposed, "planes_t"): one dot per
code position of the words, on x gathered into plane order by gather_x_planes. Reference: reference.py
gptq_linear_ref; gather_x_planes_ref below.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.pdl import wait_for_predecessor
from kernels.quant_linear.codes import TWO_23, _code, _input_channels
from kernels.split_k import store_split_tile


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b on tensor cores; IEEE: fp32 inputs multiplied in full precision (not tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def gather_x_planes_ref(x: torch.Tensor, perm: torch.Tensor | None, bits: int, block_k: int) -> torch.Tensor:
    """x [M, K] -> [M, K_pad] (K_pad: K rounded up to block_k, zeros past K): x[:, perm] (if perm) with the
    columns of each block_k tile in plane order, as the planes GEMM reads them: tile column j rows + r
    (rows = block_k / pack) holds channel pack r + j, the one that code position j of word row r multiplies,
    so each plane's x is a contiguous slab."""
    pack, M, K = 32 // bits, x.shape[0], x.shape[1]
    tiles = -(-K // block_k)
    xg = torch.nn.functional.pad(x[:, perm] if perm is not None else x, (0, tiles * block_k - K))
    return xg.view(M, tiles, block_k // pack, pack).transpose(2, 3).reshape(M, tiles * block_k)


@triton.jit
def _gather_x_planes_kernel(x_ptr, perm_ptr, out_ptr, K, K_PAD, stride_xm, BITS: tl.constexpr,
                            HAS_PERM: tl.constexpr, TILE_K: tl.constexpr, BLOCK: tl.constexpr):
    """gather_x_planes_ref for BLOCK columns of row program_id(1) of the output (TILE_K: the GEMM's BLOCK_K)."""
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = TILE_K // PACK
    m = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = c % TILE_K
    k = c - i + PACK * (i % ROWS) + i // ROWS  # the channel of tile column i = j rows + r: pack r + j
    xk = tl.load(x_ptr + m * stride_xm + _input_channels(perm_ptr, k, K, HAS_PERM), mask=k < K, other=0.0)
    tl.store(out_ptr + m * K_PAD + c, xk, mask=c < K_PAD)


def _int4_planes_asm(magic: int, sub: str) -> str:
    """_int4_planes' PTX: $8 / $9 two words, $10 / $11 their magic + z pairs; out $0-$7 planes 0-7, each two 16-bit
    values (one per word)."""
    lines = ["prmt.b32 l, $8, $9, 0x5410;", "prmt.b32 h, $8, $9, 0x7632;", "prmt.b32 z, $10, $11, 0x5410;"]
    for j in range(8):
        src = "l" if j < 4 else "h"
        if j % 4:
            lines.append(f"shr.b32 {src}, {src}, 4;")
        lines.append(f"lop3.b32 t, {src}, 0x000F000F, {magic:#010x}, 0xEA; {sub} ${j}, t, z;")
    return "{ .reg .b32 l, h, z, t; " + " ".join(lines) + " }"


INT4_PLANES_BF16 = tl.constexpr(_int4_planes_asm(0x43004300, "sub.rn.bf16x2"))
INT4_PLANES_F16 = tl.constexpr(_int4_planes_asm(0x64006400, "sub.rn.f16x2"))


@triton.jit
def _int4_planes(words, magic_z, DTYPE: tl.constexpr):
    """q - z of the 8 codes of every word, the 8 planes, exact in DTYPE (bf16 or fp16), as int16 bits: one lop3
    puts a code into the mantissa of the 16-bit magic number (bf16 128 = 0x4300, fp16 1024 = 0x6400; the ulp
    there is 1, so magic | q reads as magic + q), one sub.{bf16x2, f16x2} of magic_z (magic + z) leaves q - z.
    Two words at a time: their low halves paired (one prmt), their high halves paired, then a shift, lop3 and
    sub give a plane for both words (the pairs the tensor cores read when the two are neighbours along K, as
    Triton packs them). CUDA only: inline PTX."""
    asm: tl.constexpr = INT4_PLANES_BF16 if DTYPE == tl.bfloat16 else INT4_PLANES_F16
    return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, magic_z],
                                     dtype=(tl.int16,) * 8, is_pure=True, pack=2)


@triton.jit
def _rn(r, n, SWAP: tl.constexpr):
    """r and n offsets as the two axes of a planes tile: (r down, n across), or SWAP (n down, r across)."""
    if SWAP:  # one return: Triton wants every return of a function to have the same type
        r2, n2 = r[None, :], n[:, None]
    else:
        r2, n2 = r[:, None], n[None, :]
    return r2, n2


@triton.jit
def _plane_dot(x_plane, w_plane, acc, SWAP: tl.constexpr, IEEE: tl.constexpr):
    """acc + x_plane @ w_plane, or SWAP: acc^T + w_plane^T @ x_plane^T (the operands as loaded, transposed)."""
    if SWAP:
        acc = _dot(w_plane, x_plane, acc, IEEE)
    else:
        acc = _dot(x_plane, w_plane, acc, IEEE)
    return acc


@triton.jit
def _gptq_planes_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, N_W, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm,
                        K_TILES, SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BITS: tl.constexpr,
                        GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr, PTX_DEQUANT: tl.constexpr,
                        IEEE: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] output tile over K_TILES tiles of K on tensor cores: x gathered in plane order
    (gather_x_planes_ref), so plane j of a K tile, the codes at position j of its words [BLOCK_K / pack,
    BLOCK_N], multiplies the contiguous x columns [j rows, (j + 1) rows) of the tile: one dot per plane on the
    words as loaded, no reshape. TILE_IN_GROUP: a K tile lies in one group, so the dots run on exact q - z and
    the scale comes after them; then PTX_DEQUANT (Int4, 16-bit x, CUDA) dequantizes the 8 planes in bf16x2 /
    f16x2 (_int4_planes), else each plane in fp32 (2^23 + q, exact). Without TILE_IN_GROUP each weight is
    scaled (in fp32) before the dot.
    SWAP (kind "planes_t"): every tile transposed, out^T = W_plane^T @ x_plane^T, so the dequantized plane is
    the dot's first operand, which Hopper's wgmma reads from registers (the second only from shared memory):
    the plane need not be stored to shared memory first; x^T is the small second operand and the rows are
    wgmma's N (8 to 256), so BLOCK_M may be 16 to 256. The tile is transposed back once, at the store."""
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PACK
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_n = offs_n < N_W
    wait_for_predecessor(USE_PDL)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_x, r_x = _rn(offs_m, offs_r, SWAP)  # x's tile: [BLOCK_M, ROWS], or SWAP [ROWS, BLOCK_M]
    for i in range(K_TILES):
        k0 = (tl.program_id(2) * K_TILES + i) * BLOCK_K
        rows = k0 // PACK + offs_r
        r_w, n_w = _rn(rows, offs_n, SWAP)  # the words' tile: [ROWS, BLOCK_N], or SWAP [BLOCK_N, ROWS]
        words = tl.load(qw_ptr + r_w * N_W + n_w, mask=(r_w < K // PACK) & (n_w < N_W), other=0)
        # x is zero past K up to the padded tile; the last split's last tiles can lie past that: not read
        x_plane = x_ptr + m_x * stride_xm + k0 + r_x  # plane 0's slab
        x_mask = (m_x < M) & (r_x * 0 + k0 < K)
        if TILE_IN_GROUP:
            g = tl.minimum(k0, K - 1) // GROUP
            _, scale = _rn(offs_r, tl.load(s_ptr + g * N_W + offs_n, mask=mask_n, other=0.0).to(tl.float32), SWAP)
            _, zero = _rn(offs_r, tl.load(z_ptr + g * N_W + offs_n, mask=mask_n, other=0), SWAP)
            part = tl.zeros_like(acc)
            if PTX_DEQUANT:  # each 32-bit result: one plane of two neighbouring words
                MAGIC_16: tl.constexpr = 0x4300 if DTYPE == tl.bfloat16 else 0x6400
                magic_z = tl.broadcast_to((MAGIC_16 + zero.to(tl.int32)) * 0x10001, words.shape)
                planes = _int4_planes(words, magic_z, DTYPE)
                for j in tl.static_range(PACK):
                    part = _plane_dot(tl.load(x_plane + j * ROWS, mask=x_mask, other=0.0),
                                      planes[j].to(DTYPE, bitcast=True), part, SWAP, False)
            else:
                zero_f = zero.to(tl.float32) + TWO_23
                for j in tl.static_range(PACK):
                    code, _ = _code(words, words, j, BITS, False)
                    part = _plane_dot(tl.load(x_plane + j * ROWS, mask=x_mask, other=0.0),
                                      (code - zero_f).to(DTYPE), part, SWAP, IEEE)
            acc += part * scale
        else:  # a group holds whole words (group_size % pack == 0): one group per word row
            g, in_n = _rn(tl.minimum(rows * PACK, K - 1) // GROUP, mask_n, SWAP)
            ptrs = g * N_W + n_w
            scale = tl.load(s_ptr + ptrs, mask=in_n, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + ptrs, mask=in_n, other=0).to(tl.float32) + TWO_23
            for j in tl.static_range(PACK):
                code, _ = _code(words, words, j, BITS, False)
                acc = _plane_dot(tl.load(x_plane + j * ROWS, mask=x_mask, other=0.0),
                                 ((code - zero) * scale).to(DTYPE), acc, SWAP, IEEE)
    if SWAP:
        acc = tl.trans(acc)
    store_split_tile(acc, b_ptr, out_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, SPLIT_K, HAS_BIAS, SPLIT)


def gather_x_planes(x: torch.Tensor, perm: torch.Tensor | None, bits: int, block_k: int) -> torch.Tensor:
    """Triton version of gather_x_planes_ref: one launch (in place of act-order's index_select)."""
    M, K = x.shape
    k_pad = triton.cdiv(K, block_k) * block_k
    out = torch.empty(M, k_pad, device=x.device, dtype=x.dtype)
    block = 1024
    _gather_x_planes_kernel[(triton.cdiv(k_pad, block), M)](x, perm if perm is not None else x, out, K, k_pad,
                                                             x.stride(0), BITS=bits, HAS_PERM=perm is not None,
                                                             TILE_K=block_k, BLOCK=block)
    return out


@functools.lru_cache
def _ptx_dequant(device: torch.device, dtype: torch.dtype, bits: int) -> bool:
    """Whether the planes GEMM dequantizes Int4 in 16-bit pairs (inline PTX: CUDA; sub.bf16x2 needs sm_90)."""
    if device.type != "cuda" or bits != 4:
        return False
    return dtype == torch.float16 or (dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0))
