"""GPTQ W4A16 / W8A16 linear layer: y = x @ dequantize(W)^T + bias, the integers dequantized in registers.

Runtime layout (engine/quantization/gptq.py builds it from a checkpoint):
    qweight [K / pack, N_W] int32, pack = 32 / bits: input channel k of output n sits in bits
            [(k % pack) * bits, (k % pack + 1) * bits) of qweight[k // pack, n]; N_W >= N, padded
    scales  [G, N_W] and zeros [G, N_W] (int16): input channel k belongs to group k // group_size
    perm    [K] or None: act-order checkpoints are reordered at load so that groups are contiguous;
            then the kernels read the input gathered, x[:, perm]
    W[n, k] = scales[k // group_size, n] * (q[k, n] - zeros[k // group_size, n])

Decoding streams the weights, so the kernels spend as few instructions per weight as they can:
- no int -> float conversion: a code q ORed into the mantissa of 2^23 (0x4B000000) reads as the fp32 number
  2^23 + q, and one subtraction of 2^23 + z gives q - z exactly. A code left in place at bit p of its word
  reads as 2^23 + q 2^p, so the codes of a word's low 16 bits are masked in place and the high 16 bits
  shifted down once; the 2^-p goes into the activation, which is loaded once for a whole row of words;
- the scale once per group and column, on the group's sum: sum_k x_k s (q_k - z) = s sum_k x_k (q_k - z);
- one row (decode at one sequence): a GEMV, no tensor cores; for weights of 2^24 codes and more, in half2 on
  CUDA (x gathered and paired in fp16 once per call, codes turned into fp16 by one lop3 on 1024 = 0x6400 two
  at a time, sub.f16x2 and fma.rn.f16x2: 1.5 instructions a weight where the fp32 GEMV, kind "gemv", spends
  about 3; the fp32 GEMV also runs smaller weights and under the interpreter);
- 2 to 64 rows (decode at several sequences): the "planes" GEMM, tl.dot on exact (q - z) tiles in the
  activation dtype, one dot per code position j of the words ("plane" j: the channels pack r + j of word rows
  r) on the words as loaded. x is gathered once per call (act-order's perm and this order in one launch) so
  that each plane's channels are contiguous columns; Int4 with bf16 / fp16 x is dequantized on CUDA in
  bf16x2 / f16x2, two words at a time (their halves paired by two prmt, then per plane a shift, one lop3
  onto 128 = 0x4300 or 1024 = 0x6400 and one sub: about 1.5 instructions a weight, the pairs already as the
  tensor cores read them), else each plane by the fp32 2^23 trick. From 17 rows the same GEMM runs transposed
  (kind "planes_t": the dequantized plane the first operand, which Hopper's wgmma reads from registers);
- split along K so that even one row keeps every SM streaming (kernels/split_k.py: one launch), and
  act-order's gather of x done inside the kernel.
From 129 rows (kind "dequant": larger batches, prefills) each weight is dequantized into a 16-bit scratch
and multiplied by cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.activation import load_x
from kernels.pdl import wait_for_predecessor
from kernels.split_k import split_for, split_k_launch, store_split_tile

DEQUANT_MATMUL_MIN_ROWS = 129  # from here on (kind "dequant"): dequantize to 16 bits, then cuBLAS
MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2^23: ORing an integer below 2^23 into it gives 2^23 + that integer
TWO_23 = tl.constexpr(8388608.0)


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
def _code(words, high, J: tl.constexpr, BITS: tl.constexpr, IN_PLACE: tl.constexpr):
    """(2^23 + q 2^P in fp32, exact; 2^P) for code J of every word. IN_PLACE: the code stays where it is in its
    half of the word (high: the words shifted down by 16), P its position there; else it is shifted down, P = 0."""
    HALF: tl.constexpr = 16 // BITS
    if IN_PLACE:
        P: tl.constexpr = BITS * (J % HALF)
        src = words if J < HALF else high
        codes = (src & (((1 << BITS) - 1) << P)) | MAGIC
    else:
        P: tl.constexpr = 0
        codes = ((words >> (BITS * J)) & ((1 << BITS) - 1)) | MAGIC
    return codes.to(tl.float32, bitcast=True), 1.0 * (1 << P)


@triton.jit
def _input_channels(perm_ptr, k, K, HAS_PERM: tl.constexpr):
    """The columns of x that channels k read: perm[k] for act-order weights."""
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=k < K, other=0)
    return k


@triton.jit
def _columns(t, PACK: tl.constexpr):
    """The PACK columns of t [R, PACK] (PACK = 4 or 8), each [R]."""
    R: tl.constexpr = t.shape[0]
    if PACK == 8:
        even, odd = tl.split(tl.reshape(t, (R, 4, 2)))
        c0, c2 = tl.split(tl.reshape(even, (R, 2, 2)))
        c1, c3 = tl.split(tl.reshape(odd, (R, 2, 2)))
        x0, x4 = tl.split(c0)
        x2, x6 = tl.split(c2)
        x1, x5 = tl.split(c1)
        x3, x7 = tl.split(c3)
        return x0, x1, x2, x3, x4, x5, x6, x7
    else:
        even, odd = tl.split(tl.reshape(t, (R, 2, 2)))
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3


@triton.jit
def _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The GEMVs' weight loads for the K tile at k0 (a tile lies in one group): its word rows, words
    [BLOCK_K / pack, BLOCK_N], and the group's scales [BLOCK_N] (fp32) and zero points [BLOCK_N] (as stored);
    nothing at or past k_end."""
    PACK: tl.constexpr = 32 // BITS
    rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    mask_n = offs_n < N_W
    words = tl.load(qw_ptr + rows[:, None] * N_W + offs_n[None, :],
                    mask=(rows < k_end // PACK)[:, None] & mask_n[None, :], other=0)
    g = tl.minimum(k0, K - 1) // GROUP
    in_range = mask_n & (offs_n * 0 + k0 < k_end)
    scale = tl.load(s_ptr + g * N_W + offs_n, mask=in_range, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g * N_W + offs_n, mask=in_range, other=0)
    return rows, words, scale, zero


@triton.jit
def _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, N_W, K, m, stride_xm, k0, k_end, offs_n,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The fp32 GEMV's loads for the K tile at k0: _word_tile's, zero points in fp32, and x [BLOCK_K / pack,
    pack]; nothing at or past k_end."""
    rows, words, scale, zero = _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP, BLOCK_K)
    xt = _gemv_x(x_ptr, perm_ptr, m, stride_xm, rows, K, k_end, BITS, HAS_PERM, SILU_MUL)
    return words, scale, zero.to(tl.float32), xt


@triton.jit
def _gemv_x(x_ptr, perm_ptr, m, stride_xm, rows, K, k_end, BITS: tl.constexpr, HAS_PERM: tl.constexpr,
            SILU_MUL: tl.constexpr):
    """x [BLOCK_K / pack, pack] of the word rows `rows` (gathered by perm; SILU_MUL: SiLU(gate) * up of
    [gate | up] rows, kernels/activation.py load_x); nothing at or past k_end."""
    PACK: tl.constexpr = 32 // BITS
    k = rows[:, None] * PACK + tl.arange(0, PACK)[None, :]
    return load_x(x_ptr + m * stride_xm + _input_channels(perm_ptr, k, k_end, HAS_PERM), k < k_end, K, SILU_MUL)


@triton.jit
def _gptq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, N_W, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
                      stride_xm, K_TILES, SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One row of x (program_id(1)) times BLOCK_N columns of W^T over K_TILES tiles of K, in fp32 multiply-adds.
    A K tile lies in one group. The next tile's loads are issued before this tile's arithmetic, so each
    program keeps two tiles in flight (at one row the kernel waits on memory latency more than on bandwidth);
    the first tile's weights before waiting on the kernel that wrote x (kernels/pdl.py). SILU_MUL: x is the gate
    half of [gate | up] rows (row stride stride_xm), multiplied as SiLU(gate) * up."""
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PACK
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(2) * K_TILES * BLOCK_K
    k_end = tl.minimum(k0 + K_TILES * BLOCK_K, K)
    rows, words, scale, zero = _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP, BLOCK_K)
    zero = zero.to(tl.float32)
    wait_for_predecessor(USE_PDL)
    xt = _gemv_x(x_ptr, perm_ptr, m, stride_xm, rows, K, k_end, BITS, HAS_PERM, SILU_MUL)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for _ in range(K_TILES):
        k0 += BLOCK_K
        next_tile = _gemv_tile(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, N_W, K, m, stride_xm, k0, k_end, offs_n,
                               BITS, GROUP, HAS_PERM, SILU_MUL, BLOCK_K)
        high = words >> 16
        xs = _columns(xt.to(tl.float32), PACK)
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PACK):
            code, pos = _code(words, high, j, BITS, True)
            w = code - (zero * pos + TWO_23)[None, :]  # (q - z) 2^P
            part += (xs[j] * (1.0 / pos))[:, None] * w
        acc += part * scale[None, :]
        words, scale, zero, xt = next_tile
    y = tl.sum(acc, axis=0)[None, :]
    store_split_tile(y, b_ptr, out_ptr, part_ptr, count_ptr, m + tl.arange(0, 1), offs_n, M, N, SPLIT_K,
                     HAS_BIAS, SPLIT)


def half2_pair_shift(p: int, bits: int) -> tuple[int, int]:
    """(shift of the word, position of the codes in each half after it) for the half2 GEMV's code pair p, the
    codes p and p + pack / 2 of a word: Int4 reads pairs 0-1 in place from the word and 2-3 from it shifted by
    8, at position 0 or 4 (1024 + 16 q stays exact in fp16); Int8 shifts each pair down to position 0."""
    return (8 * (p // 2), 4 * (p % 2)) if bits == 4 else (bits * p, 0)


def gather_x_half2_ref(x: torch.Tensor, perm: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [1, K] -> int32 [K / 2]: x[:, perm] (if perm) in fp16 pairs as the half2 GEMV reads them: word
    i = r pack / 2 + p (p < pack / 2) holds channel pack r + p in its low half, pack r + p + pack / 2 in its
    high half (the two codes one lop3 picks out of qweight's word r), each times 2^-(bits + position): the
    2^-bits keeps sums of pack products x (q - z) within fp16, 2^-position undoes the code's place."""
    pack = 32 // bits
    xg = (x[0, perm] if perm is not None else x[0]).float().view(-1, 2, pack // 2)  # [K / pack, (lo, hi), p]
    factor = torch.tensor([2.0 ** -(bits + half2_pair_shift(p, bits)[1]) for p in range(pack // 2)],
                          device=x.device)
    pairs = (xg * factor).half().transpose(1, 2).contiguous()  # [K / pack, p, (lo, hi)]
    return pairs.view(torch.int32).reshape(-1)


@triton.jit
def _gather_x_half2_kernel(x_ptr, perm_ptr, out_ptr, K, BITS: tl.constexpr, HAS_PERM: tl.constexpr,
                           SILU_MUL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """gather_x_half2_ref for BLOCK words of the output (SILU_MUL: of SiLU(gate) * up, x the [gate | up] row)."""
    HALF_PACK: tl.constexpr = 16 // BITS
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p = i % HALF_PACK
    k_lo = (i // HALF_PACK) * (2 * HALF_PACK) + p
    mask = k_lo < K
    if BITS == 4:  # half2_pair_shift: odd pairs sit at position 4
        factor = tl.where(p % 2 == 1, 1.0 / 256, 1.0 / 16)
    else:
        factor = 1.0 / 256
    wait_for_predecessor(USE_PDL)
    lo = load_x(x_ptr + _input_channels(perm_ptr, k_lo, K, HAS_PERM), mask, K, SILU_MUL).to(tl.float32)
    hi = load_x(x_ptr + _input_channels(perm_ptr, k_lo + HALF_PACK, K, HAS_PERM), mask, K, SILU_MUL)
    lo = (lo * factor).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = (hi.to(tl.float32) * factor).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    tl.store(out_ptr + i, lo | (hi << 16), mask=mask)


@triton.jit
def _half2_dot_pair(shifted, mask2, x2, z2, acc2):
    """acc2 + x2 (q - z) 2^P in half2: the pair of codes under mask2 (a field at bit P of each half of
    `shifted`) ORed into fp16 1024 (0x6400) reads as 1024 + q 2^P (the ulp at 1024 is 1); minus z2 = 1024 + z 2^P
    it is (q - z) 2^P, exact. 3 instructions for 2 weights (lop3, sub.f16x2, fma.rn.f16x2); all operands int32
    holding two fp16."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 c, d; lop3.b32 c, $1, $2, 0x64006400, 0xEA; sub.f16x2 d, c, $4; fma.rn.f16x2 $0, $3, d, $5; }",
        "=r,r,r,r,r,r", [shifted, mask2, x2, z2, acc2], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _half2_sum(h2):
    """lo + hi of an int32 holding two fp16, added in fp16 (the sum of pack products, |sum| <= pack |x|), then
    widened to fp32."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h, s; mov.b32 {l, h}, $1; add.rn.f16 s, l, h; cvt.f32.f16 $0, s; }", "=f,r", [h2],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _half2_gemv_tile(xh_ptr, qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The half2 GEMV's loads for the K tile at k0: _word_tile's, zero points in int32, and x pairs
    [BLOCK_K / pack, 1], one load per pair position p with offsets from rows[:, None] as the words', so each
    lands in the words' layout (no shared-memory conversion); nothing at or past k_end."""
    rows, words, scale, zero = _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP, BLOCK_K)
    return words, scale, zero.to(tl.int32), _half2_x(xh_ptr, rows, k_end, BITS)


@triton.jit
def _half2_x(xh_ptr, rows, k_end, BITS: tl.constexpr):
    """The x pairs of the word rows `rows`, [BLOCK_K / pack, 1] per pair position; nothing at or past k_end."""
    PACK: tl.constexpr = 32 // BITS
    HALF_PACK: tl.constexpr = PACK // 2
    x2 = ()
    for p in tl.static_range(HALF_PACK):
        x2 = x2 + (tl.load(xh_ptr + rows[:, None] * HALF_PACK + p, mask=(rows < k_end // PACK)[:, None], other=0),)
    return x2


@triton.jit
def _gptq_gemv_half2_kernel(xh_ptr, qw_ptr, s_ptr, z_ptr, N_W, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
                            stride_xm, K_TILES, SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            USE_PDL: tl.constexpr):
    """One row: x (gathered, 2^-bits, paired: gather_x_half2_ref) times BLOCK_N columns of W^T over K_TILES
    tiles of K. Each word's pack / 2 code pairs go through _half2_dot_pair into one half2 sum per word (pack
    products of x 2^-bits (q - z): |sum| <= pack |x|, far from fp16's 65504), which is added in fp32 and scaled
    once per tile (a tile lies in one group). The next tile's loads are issued before this tile's arithmetic,
    the first tile's weights before waiting on the kernel that wrote x (kernels/pdl.py).
    stride_xm: unused (the packed x is one row), in split_k_launch's common signature."""
    PACK: tl.constexpr = 32 // BITS
    HALF_PACK: tl.constexpr = PACK // 2
    ROWS: tl.constexpr = BLOCK_K // PACK
    CODE_MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001  # one code in each half
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(2) * K_TILES * BLOCK_K
    k_end = tl.minimum(k0 + K_TILES * BLOCK_K, K)
    rows, words, scale, zero = _word_tile(qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP, BLOCK_K)
    zero = zero.to(tl.int32)
    wait_for_predecessor(USE_PDL)
    x2 = _half2_x(xh_ptr, rows, k_end, BITS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for _ in range(K_TILES):
        k0 += BLOCK_K
        next_tile = _half2_gemv_tile(xh_ptr, qw_ptr, s_ptr, z_ptr, N_W, K, k0, k_end, offs_n, BITS, GROUP,
                                     BLOCK_K)
        high = words >> 8
        zero_row = zero[None, :]  # into the words' layout once a tile, not once per pair position
        h2 = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)  # two fp16 zeros
        for p in tl.static_range(HALF_PACK):
            if BITS == 4:  # half2_pair_shift
                shifted, position = (words if p < 2 else high), 4 * (p % 2)
            else:
                shifted, position = words >> (BITS * p), 0
            mask2 = tl.full((ROWS, BLOCK_N), CODE_MASK << position, tl.int32)
            z2 = tl.broadcast_to((0x6400 + (zero_row << position)) * 0x10001, (ROWS, BLOCK_N))  # 1024 + z 2^P
            h2 = _half2_dot_pair(shifted, mask2, tl.broadcast_to(x2[p], (ROWS, BLOCK_N)), z2, h2)
        acc += _half2_sum(h2) * scale[None, :]
        words, scale, zero, x2 = next_tile
    y = tl.sum(acc, axis=0)[None, :] * (1 << BITS)
    store_split_tile(y, b_ptr, out_ptr, part_ptr, count_ptr, tl.arange(0, 1), offs_n, M, N, SPLIT_K, HAS_BIAS,
                     SPLIT)


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


def _tile_in_group(block_k: int, group_size: int, K: int) -> bool:
    return group_size >= K or group_size % block_k == 0


HALF2_MIN_WEIGHTS = 1 << 24  # one row of a weight from this size on: the half2 GEMV (below, its x gather costs more)


def matmul_config(M: int, N: int, K: int, bits: int, group_size: int, device: torch.device) -> dict:
    """Kernel, tile sizes and split-K for an [M, K] x [K, N] GPTQ product: the best of benchmarks/quant.py's
    sweeps on the H200 at the 7B shapes (RESULTS.md). One row: the half2 GEMV from 2^24 weights (Int4 3072 x
    24576 21.7 against the fp32 GEMV's 29.3 us), the fp32 one below (3072 x 3072 8.4 against 8.4, 1536 x 3072
    6.3 against 7.3: the separate gather launch is the difference); 4 KB of Int4 words a tile, about 4
    programs per SM, 8 at N >= 8192; Int8 at N >= 8192 8 KB tiles, 4 warps, ~4 programs per SM (3072 x 8728
    13.9 against 16.6 us with the fp32 GEMV's 128 x 64 tiles). 2 to 64 rows: the planes GEMM, BLOCK_N 64, BLOCK_K
    128, 4 warps, 3 stages (the H200 sweep at 16 and 32 rows: best or within ~8% of it at every 7B and
    FalconMamba shape; 4 stages 2-7% slower) to 16 rows; from 17 rows its transposed kind planes_t (session 9's
    sweep, 7B and FalconMamba shapes: 0.76-0.97x the planes time at 32 rows, 0.67-0.86x at 64), BLOCK_N 64, 4
    warps, 3 stages to 32 rows, 2 to 64; to 128 rows Int4 64 x 128 tiles with 8 warps, Int8 128 x 64 with 4
    (the best at most shapes of 128 rows; 0.48-0.56x the time of the reshaping GEMM it replaced there). From
    129 rows the weight dequantized, then cuBLAS (faster than planes_t at 256 rows at 13 of the 16 shapes and
    formats, at 512 at all; at 128 rows at the small projections only)."""
    if M >= DEQUANT_MATMUL_MIN_ROWS:
        return dict(kind="dequant")
    if M == 1:
        wide = N >= 8192
        bn, bk, warps, waves = (64, 128, 4, 4) if bits == 8 and wide else (64, 128, 2, 8 if wide else 4)
        while not _tile_in_group(bk, group_size, K):
            bk //= 2
        split = split_for(triton.cdiv(N, bn), K, bk, waves, device)
        # half2 math is inline PTX: CUDA only (Triton's interpreter runs the fp32 GEMV)
        half2 = device.type == "cuda" and K * N >= HALF2_MIN_WEIGHTS
        return dict(kind="gemv_half2" if half2 else "gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                    num_stages=1)
    if M <= 16:  # a plane's dot needs 16 word rows: BLOCK_K 128 (Int4) / 64 (Int8) at least
        kind, bm, bn, bk, warps, stages = "planes", 16, 64, 128, 4, 3
    elif M <= 64:
        kind, bm, bn, bk, warps, stages = "planes_t", triton.next_power_of_2(M), 64, 128, 4, 3 if M <= 32 else 2
    else:
        kind, bk, stages = "planes_t", 128, 3
        bm, bn, warps = (64, 128, 8) if bits == 4 else (128, 64, 4)
    split = split_for(triton.cdiv(N, bn) * triton.cdiv(M, bm), K, bk, 4, device)
    return dict(kind=kind, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)


def gptq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Triton version of dequantize_ref, in `dtype`."""
    K, N_W = qweight.shape[0] * (32 // bits), qweight.shape[1]
    w = torch.empty(K, N_W, device=qweight.device, dtype=dtype)
    bk = 16 * (32 // bits)
    _gptq_dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(N_W, 128))](qweight, scales, zeros, w, K, N_W, BITS=bits,
                                                                       GROUP=group_size, BLOCK_K=bk, BLOCK_N=128)
    return w


def gather_x_half2(x: torch.Tensor, perm: torch.Tensor | None, bits: int, silu_mul: bool = False) -> torch.Tensor:
    """Triton version of gather_x_half2_ref: one launch. silu_mul: x is the row [1, 2K] = [gate | up] (contiguous),
    gathered as SiLU(gate) * up: gather_x_half2_ref(silu_mul_ref(gate, up), perm, bits)."""
    K = x.shape[1] // 2 if silu_mul else x.shape[1]
    out = torch.empty(K // 2, device=x.device, dtype=torch.int32)
    block = 1024
    _gather_x_half2_kernel[(triton.cdiv(K // 2, block),)](x, perm if perm is not None else x, out, K, BITS=bits,
                                                           HAS_PERM=perm is not None, SILU_MUL=silu_mul, BLOCK=block,
                                                           **pdl.launch_kwargs(x.device))
    return out


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


def gptq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                out_features: int | None = None, config: dict | None = None, silu_mul: bool = False) -> torch.Tensor:
    """Triton version of gptq_linear_ref (config: kernel and tiles, for benchmarks; default matmul_config).
    silu_mul (the GEMV kinds, i.e. one row): x is [M, 2K] = [gate | up] and the product is of SiLU(gate) * up,
    computed as x is loaded (the half2 GEMV: gathered): gptq_linear_ref(silu_mul_ref(gate, up), ...) in the
    launches of the product alone."""
    x = x_full = x.contiguous()  # x_full: the [gate | up] rows with silu_mul
    if silu_mul:
        x = x[:, :x.shape[1] // 2]  # the gates, a view: each row's up follows its gate (row stride 2K)
    M, K = x.shape
    N_W = qweight.shape[1]
    N = out_features or N_W
    cfg = dict(config or matmul_config(M, N, K, bits, group_size, x.device))
    kind = cfg.pop("kind")
    assert not silu_mul or kind in ("gemv", "gemv_half2"), f"SiLU * mul in the loads of the GEMVs only, not {kind}"
    if kind == "dequant":
        if perm is not None:
            x = x.index_select(1, perm)
        w = gptq_dequantize(qweight, scales, zeros, bits, group_size, x.dtype)[:, :N]
        return torch.addmm(bias, x, w) if bias is not None else x @ w
    if kind == "gemv_half2":
        assert M == 1, "the half2 GEMV takes one row"
        return split_k_launch(_gptq_gemv_half2_kernel, x, (qweight, scales, zeros, N_W), bias, N, 1, cfg,
                              x_arg=gather_x_half2(x_full, perm, bits, silu_mul), BITS=bits, GROUP=group_size)
    if kind == "gemv":  # gathers x by perm itself: 128 values per [BLOCK_K / pack, BLOCK_N] words
        args = (qweight, scales, zeros, perm if perm is not None else qweight, N_W)
        return split_k_launch(_gptq_gemv_kernel, x, args, bias, N, 1, cfg, BITS=bits, GROUP=group_size,
                              HAS_PERM=perm is not None, SILU_MUL=silu_mul)
    tile_in_group = _tile_in_group(cfg["BLOCK_K"], group_size, K)
    if kind in ("planes", "planes_t"):  # x gathered (by perm) into plane order once here, not in each N tile's program
        assert tile_in_group or group_size % (32 // bits) == 0, "the planes GEMM needs groups of whole words"
        ptx = tile_in_group and _ptx_dequant(x.device, x.dtype, bits)
        return split_k_launch(_gptq_planes_kernel, x, (qweight, scales, zeros, N_W), bias, N, cfg["BLOCK_M"], cfg,
                              x_arg=gather_x_planes(x, perm, bits, cfg["BLOCK_K"]), BITS=bits, GROUP=group_size,
                              TILE_IN_GROUP=tile_in_group, PTX_DEQUANT=ptx, IEEE=x.dtype == torch.float32,
                              SWAP=kind == "planes_t")
    raise ValueError(f"unknown GPTQ kernel kind {kind!r}")
