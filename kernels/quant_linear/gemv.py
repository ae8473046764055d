"""The one-row GEMVs, no tensor cores (kinds "gemv" and "gemv_half2"): the fp32 GEMV gathers x by perm as it
loads it; the half2 GEMV (CUDA) reads x gathered and paired in fp16 by gather_x_half2. Reference:
reference.py gptq_linear_ref at one row; gather_x_half2_ref below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.activation import load_x
from kernels.pdl import wait_for_predecessor
from kernels.quant_linear.codes import TWO_23, _code, _input_channels
from kernels.split_k import store_split_tile


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
