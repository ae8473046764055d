"""The one-row GPTQ GEMV in half2 (kind "gemv_half2"; kernels/quant_linear/__init__.py states the weight layout):
y = x @ dequantize(W)^T + bias for one row of x. Reference: reference.py gptq_linear_ref at one row, and
gather_x_half2_ref below for the gathered x it reads.

Decoding one sequence streams the weights, and an Int4 weight is half a byte: at the H200's ~16 bytes a cycle
and SM, keeping up with memory takes ~32 weights a cycle and SM, so the instructions per weight, not the bytes,
bound the kernel (the SM issues 4 warp instructions a cycle, 128 thread instructions). Per weight here:
- x is gathered by perm into fp16 pairs scaled by 2^-(bits + 2 + position) (gather_x_half2_ref), so that the
  loop reads each pair as one 32-bit operand: in the GEMV's launch, each split's share by its programs into a
  scratch row that they all write alike, then read back after a barrier (a separate gather launch cost
  more than the whole product at small weights);
- a pair of codes becomes fp16 by one lop3 onto 1024 (0x6400: the ulp there is 1, so 1024 | q reads as
  1024 + q), then one sub.f16x2 of 1024 + z and one fma.rn.f16x2 with the x pair: 1.5 instructions a weight,
  plus one shift a word (Int4: the upper two codes of each half);
- each thread holds all its warp's word rows of the tile in its 4 columns (BLOCK_N = 128 x the warps along
  the columns: a warp's 16-byte loads span the columns, no lane along K), so the fp16 sums of a column's rows
  add up in its own registers (one add.f16x2 a word) and only their sum is widened to fp32 and scaled: 3
  instructions a column and tile, not a word;
- no masks in the loop: columns past the stored ones are clamped (loaded again, not stored) and every K tile
  is whole (half2_config picks BLOCK_K dividing K and the group), so no zero-filled registers either;
- scales and zero points are loaded in the words' layout ([1, BLOCK_N], 4 a thread), not converted to it
  through shared memory each tile.
fp16 range: a tile's sum is at most rows x pack x (2^bits - 1) x 2^-(bits + 2) |x| (<= 7.5 |x| at 4 word rows),
so it overflows only for |x| beyond ~8,000; rounding: one fp16 rounding a product and an add, over the 8 x
rows products of a column and tile (~1e-3 relative at 4 rows, below bf16's output rounding).

Triton's interpreter has no inline PTX: there (PTX=False) the same steps run on fp16 values split out of the
32-bit pairs, so the kernel's indexing is tested on the CPU (tests/kernels/test_quant_linear.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.activation import load_x
from kernels.pdl import wait_for_predecessor
from kernels.split_k import split_for, split_k_launch, store_split_tile

X_HEADROOM = tl.constexpr(4)  # x also scaled by 1 / 4: a 4-row tile's fp16 sum as far from 65504 as 1 row's


def half2_pair_shift(p: int, bits: int) -> tuple[int, int]:
    """(shift of the word, position of the codes in each half after it) for code pair p, the codes p and
    p + pack / 2 of a word: Int4 reads pairs 0-1 in place from the word and 2-3 from it shifted by 8, at
    position 0 or 4 (1024 + 16 q stays exact in fp16); Int8 shifts each pair down to position 0."""
    return (8 * (p // 2), 4 * (p % 2)) if bits == 4 else (bits * p, 0)


def gather_x_half2_ref(x: torch.Tensor, perm: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [1, K] -> int32 [K / 2]: x[:, perm] (if perm) in fp16 pairs as the half2 GEMV reads them: word
    i = r pack / 2 + p (p < pack / 2) holds channel pack r + p in its low half, pack r + p + pack / 2 in its
    high half (the two codes one lop3 picks out of qweight's word r), each times 2^-(bits + 2 + position): the
    2^-bits / X_HEADROOM keeps a tile's sums within fp16, 2^-position undoes the code's place."""
    pack = 32 // bits
    xg = (x[0, perm] if perm is not None else x[0]).float().view(-1, 2, pack // 2)  # [K / pack, (lo, hi), p]
    factor = torch.tensor([2.0 ** -(bits + half2_pair_shift(p, bits)[1]) / X_HEADROOM.value for p in range(pack // 2)],
                          device=x.device)
    pairs = (xg * factor).half().transpose(1, 2).contiguous()  # [K / pack, p, (lo, hi)]
    return pairs.view(torch.int32).reshape(-1)


@triton.jit
def _pair_channels(perm_ptr, i, mask, BITS: tl.constexpr, HAS_PERM: tl.constexpr):
    """The x channels (low, high) of gather_x_half2_ref's words i: perm's (a weight: read before the wait)."""
    HALF_PACK: tl.constexpr = 16 // BITS
    k_lo = (i // HALF_PACK) * (2 * HALF_PACK) + i % HALF_PACK
    k_hi = k_lo + HALF_PACK
    if HAS_PERM:
        k_lo = tl.load(perm_ptr + k_lo, mask=mask, other=0)
        k_hi = tl.load(perm_ptr + k_hi, mask=mask, other=0)
    return k_lo, k_hi


@triton.jit
def _pair_words(x_ptr, k_lo, k_hi, i, mask, K, BITS: tl.constexpr, SILU_MUL: tl.constexpr):
    """gather_x_half2_ref's words i from x's channels k_lo / k_hi (SILU_MUL: of SiLU(gate) * up, x the [gate | up]
    row, kernels/activation.py load_x)."""
    SCALE: tl.constexpr = 1.0 / ((1 << BITS) * X_HEADROOM)
    if BITS == 4:  # half2_pair_shift: odd pairs sit at position 4
        factor = tl.where(i % 2 == 1, SCALE / 16, SCALE)
    else:
        factor = SCALE
    lo = load_x(x_ptr + k_lo, mask, K, SILU_MUL).to(tl.float32)
    hi = load_x(x_ptr + k_hi, mask, K, SILU_MUL).to(tl.float32)
    lo = (lo * factor).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = (hi * factor).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _f16_halves(v):
    """The (low, high) fp16 of int32s holding two each (the interpreter's stand-in for f16x2 operands)."""
    return v.to(tl.int16).to(tl.float16, bitcast=True), (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _f16_pair(lo, hi):
    """Inverse of _f16_halves."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _half2_dot_pair(shifted, mask2, x2, z2, acc2, FIRST: tl.constexpr, PTX: tl.constexpr):
    """acc2 + x2 (q - z) 2^P in half2 (FIRST: without acc2): the pair of codes under mask2 (a field at bit P of
    each half of `shifted`) ORed into fp16 1024 (0x6400) reads as 1024 + q 2^P; minus z2 = 1024 + z 2^P it is
    (q - z) 2^P, exact. 3 instructions for 2 weights (lop3, sub.f16x2, fma.rn.f16x2 or mul.rn.f16x2); all
    operands int32 holding two fp16."""
    if PTX:
        if FIRST:
            out = tl.inline_asm_elementwise(
                "{ .reg .b32 c, d; lop3.b32 c, $1, $2, 0x64006400, 0xEA; sub.f16x2 d, c, $4; mul.rn.f16x2 $0, $3, d; }",
                "=r,r,r,r,r", [shifted, mask2, x2, z2], dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(
                "{ .reg .b32 c, d; lop3.b32 c, $1, $2, 0x64006400, 0xEA; sub.f16x2 d, c, $4; "
                "fma.rn.f16x2 $0, $3, d, $5; }",
                "=r,r,r,r,r,r", [shifted, mask2, x2, z2, acc2], dtype=tl.int32, is_pure=True, pack=1)
    else:
        c_lo, c_hi = _f16_halves((shifted & mask2) | 0x64006400)
        z_lo, z_hi = _f16_halves(z2)
        x_lo, x_hi = _f16_halves(x2)
        lo, hi = x_lo * (c_lo - z_lo), x_hi * (c_hi - z_hi)
        if not FIRST:
            a_lo, a_hi = _f16_halves(acc2)
            lo, hi = lo + a_lo, hi + a_hi
        out = _f16_pair(lo, hi)
    return out


@triton.jit
def _hadd2_ptx(a, b):
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _hadd2_emulated(a, b):
    a_lo, a_hi = _f16_halves(a)
    b_lo, b_hi = _f16_halves(b)
    return _f16_pair(a_lo + b_lo, a_hi + b_hi)


@triton.jit
def _half2_sum(h2, PTX: tl.constexpr):
    """lo + hi of int32s holding two fp16, added in fp16, then widened to fp32."""
    if PTX:
        out = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h, s; mov.b32 {l, h}, $1; add.rn.f16 s, l, h; cvt.f32.f16 $0, s; }", "=f,r", [h2],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo, hi = _f16_halves(h2)
        out = (lo + hi).to(tl.float32)
    return out


@triton.jit
def _tile_rows(tile, BITS: tl.constexpr, BLOCK_K: tl.constexpr, WARPS_K: tl.constexpr):
    """The word rows of K tile `tile` as [rows / WARPS_K, WARPS_K, 1]: warp w along K takes the w-th run (the
    warps on the second axis: Triton gives the first the registers then)."""
    ROWS: tl.constexpr = BLOCK_K // (32 // BITS)
    RUN: tl.constexpr = ROWS // WARPS_K
    return tile * ROWS + tl.arange(0, RUN)[:, None, None] + tl.arange(0, WARPS_K)[None, :, None] * RUN


@triton.jit
def _half2_weights(qw_ptr, s_ptr, z_ptr, N_W, tile, cols, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_K: tl.constexpr, WARPS_K: tl.constexpr):
    """K tile `tile`'s words [rows / WARPS_K, WARPS_K, BLOCK_N] and its group's scales (fp32) and zero points
    (int32), [1, WARPS_K, BLOCK_N] (each warp along K loads its copy): the words' layout, so no conversion."""
    words = tl.load(qw_ptr + _tile_rows(tile, BITS, BLOCK_K, WARPS_K) * N_W + cols)
    group = cols + (tile * BLOCK_K // GROUP * N_W + tl.zeros((1, WARPS_K, 1), tl.int32))
    return words, tl.load(s_ptr + group).to(tl.float32), tl.load(z_ptr + group).to(tl.int32)


@triton.jit
def _half2_x(xh_ptr, tile, BITS: tl.constexpr, BLOCK_K: tl.constexpr, WARPS_K: tl.constexpr, PTX: tl.constexpr):
    """K tile `tile`'s x pairs, one [rows / WARPS_K, WARPS_K, 1] per pair position (every thread holds all its
    warp's rows). A row's pairs are contiguous (16 bytes Int4, 8 Int8): on CUDA one vector load a row (Triton
    loads the [.., 1] tensors one pair at a time), pure so that Triton places it in the words' layout (not
    pure, it would be converted through shared memory); xh_ptr must come from _after_wait, so that the load
    cannot move above the wait for x's kernel."""
    HALF_PACK: tl.constexpr = 16 // BITS
    ptrs = xh_ptr + _tile_rows(tile, BITS, BLOCK_K, WARPS_K) * HALF_PACK
    if PTX and BITS == 4:
        x2 = tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptrs],
                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    elif PTX:
        x2 = tl.inline_asm_elementwise("ld.global.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptrs],
                                       dtype=(tl.int32,) * 2, is_pure=True, pack=1)
    else:
        x2 = ()
        for p in tl.static_range(HALF_PACK):
            x2 = x2 + (tl.load(ptrs + p),)
    return x2


@triton.jit
def _after_wait(ptr, PTX: tl.constexpr):
    """ptr, through an opaque move placed after wait_for_predecessor: what is computed from it stays after the
    wait even when pure."""
    if PTX:
        ptr = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [ptr.to(tl.int64)], dtype=tl.int64,
                                        is_pure=False, pack=1).to(ptr.dtype)
    return ptr


@triton.jit
def _half2_tile_sum(words, zero, x2, BITS: tl.constexpr, PTX: tl.constexpr):
    """sum over each warp's rows of the tile of x 2^-(bits + 2) (q - z), per column: [1, WARPS_K, BLOCK_N] fp16
    pairs (int32)."""
    HALF_PACK: tl.constexpr = 16 // BITS
    CODE_MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001  # one code in each half
    high = words >> 8
    h2 = words  # replaced by the first pair's products
    for p in tl.static_range(HALF_PACK):
        if BITS == 4:  # half2_pair_shift
            shifted, position = (words if p < 2 else high), 4 * (p % 2)
        else:
            shifted, position = words >> (BITS * p), 0
        mask2 = tl.full(words.shape, CODE_MASK << position, tl.int32)
        z2 = tl.broadcast_to((0x6400 + (zero << position)) * 0x10001, words.shape)  # 1024 + z 2^P
        h2 = _half2_dot_pair(shifted, mask2, tl.broadcast_to(x2[p], words.shape), z2, h2, p == 0, PTX)
    if PTX:  # a warp's rows are in each thread's registers: no shuffles
        h2 = tl.reduce(h2, 0, _hadd2_ptx, keep_dims=True)
    else:
        h2 = tl.reduce(h2, 0, _hadd2_emulated, keep_dims=True)
    return h2


@triton.jit
def _gather_split_x(x_ptr, perm_ptr, xh_ptr, K, first, count, k_lo, k_hi, BITS: tl.constexpr,
                    HAS_PERM: tl.constexpr, SILU_MUL: tl.constexpr, GATHER: tl.constexpr):
    """xh's words [first, first + count) (gather_x_half2_ref), GATHER at a time; k_lo / k_hi: the first GATHER
    words' channels (_pair_channels, loaded before the wait), each next GATHER's loaded as these are written.
    Then a barrier: the program's threads read each other's words."""
    for c in range(0, count, GATHER):
        i = first + c + tl.arange(0, GATHER)
        mask = c + tl.arange(0, GATHER) < count
        words = _pair_words(x_ptr, k_lo, k_hi, i, mask, K, BITS, SILU_MUL)
        next_mask = c + GATHER + tl.arange(0, GATHER) < count
        k_lo, k_hi = _pair_channels(perm_ptr, i + GATHER, next_mask, BITS, HAS_PERM)
        tl.store(xh_ptr + i, words, mask=mask)
    tl.debug_barrier()


@triton.jit
def _gptq_gemv_half2_kernel(x_ptr, perm_ptr, xh_ptr, qw_ptr, s_ptr, z_ptr, N_W, b_ptr, out_ptr, part_ptr, count_ptr,
                            M, N, K, stride_xm, K_TILES, SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                            BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
                            SILU_MUL: tl.constexpr, PTX: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, WARPS_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One row: x times BLOCK_N columns of W^T over this split's K tiles (K_TILES, fewer in the last split; K
    a multiple of BLOCK_K, and each tile in one group). x (SILU_MUL: SiLU(gate) * up of the [gate | up] row) is
    gathered by perm and paired first (gather_x_half2_ref's words, the split's share) into xh, the scratch of
    the whole row: every program of the split writes the same words (so any of them may be read), then
    reads its threads' back, in the words' layout (no separate gather launch). WARPS_K warps split each tile's
    rows (their sums added once, at the end, through shared memory), the others its columns (BLOCK_N = 128 x
    those: 4 columns a thread). Each tile's fp16 sum per column and warp (_half2_tile_sum) is widened and
    scaled once. The next tile's loads are issued before this tile's arithmetic, the first tile's weights and
    perm before waiting on the kernel that wrote x (kernels/pdl.py).
    stride_xm: unused (x is one row), in split_k_launch's common signature."""
    PAIRS: tl.constexpr = BLOCK_K // 2  # xh's words a K tile
    GATHER: tl.constexpr = BLOCK_N * WARPS_K  # 4 words a thread: a split's words at once at the default tiles
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # past the stored columns (N_W, a multiple of 4): the last 4 again, not stored; runs of 4 stay 16-byte loads
    cols = tl.max_contiguous(tl.multiple_of(tl.minimum(offs_n, N_W - 4 + offs_n % 4), 4), 4)[None, None, :]
    tile = tl.program_id(2) * K_TILES
    n_tiles = tl.minimum(K_TILES, K // BLOCK_K - tile)
    words, scale, zero = _half2_weights(qw_ptr, s_ptr, z_ptr, N_W, tile, cols, BITS, GROUP, BLOCK_K, WARPS_K)
    k_lo, k_hi = _pair_channels(perm_ptr, tile * PAIRS + tl.arange(0, GATHER), tl.arange(0, GATHER) < n_tiles * PAIRS,
                                BITS, HAS_PERM)
    wait_for_predecessor(USE_PDL)
    _gather_split_x(x_ptr, perm_ptr, xh_ptr, K, tile * PAIRS, n_tiles * PAIRS, k_lo, k_hi, BITS, HAS_PERM, SILU_MUL,
                    GATHER)
    xh_ptr = _after_wait(xh_ptr, PTX)  # after the barrier: the pure x loads below may not move above it
    x2 = _half2_x(xh_ptr, tile, BITS, BLOCK_K, WARPS_K, PTX)
    acc = tl.zeros((1, WARPS_K, BLOCK_N), dtype=tl.float32)
    for _ in range(1, n_tiles):
        tile += 1
        next_words, next_scale, next_zero = _half2_weights(qw_ptr, s_ptr, z_ptr, N_W, tile, cols, BITS, GROUP,
                                                           BLOCK_K, WARPS_K)
        next_x2 = _half2_x(xh_ptr, tile, BITS, BLOCK_K, WARPS_K, PTX)
        acc += _half2_sum(_half2_tile_sum(words, zero, x2, BITS, PTX), PTX) * scale
        words, scale, zero, x2 = next_words, next_scale, next_zero, next_x2
    acc += _half2_sum(_half2_tile_sum(words, zero, x2, BITS, PTX), PTX) * scale
    y = tl.sum(acc, axis=1) * ((1 << BITS) * X_HEADROOM)  # [1, BLOCK_N]
    store_split_tile(y, b_ptr, out_ptr, part_ptr, count_ptr, tl.arange(0, 1), offs_n, M, N, SPLIT_K, HAS_BIAS, SPLIT)


def half2_config(N: int, K: int, bits: int, group_size: int, device: torch.device, warps_n: int = 2,
                 warps_k: int = 1, rows: int = 4, waves: float = 8) -> dict:
    """The half2 GEMV's tiles: BLOCK_N = 128 x warps_n, `rows` word rows a warp along K (halved until the tile
    divides K and the group), split along K for ~waves programs an SM. Defaults (predicted from sm_90 SASS, not
    yet timed): 2 warps of 4 rows, 128 registers, so 8 programs (16 warps) an SM fit at once and the ~8
    programs an SM of the split are one wave; Int8 the same rows (16 words a thread and tile, as Int4)."""
    pack = 32 // bits
    block_k = rows * warps_k * pack
    while block_k > pack * warps_k and (K % block_k or (group_size < K and group_size % block_k)):
        block_k //= 2
    block_n = 128 * warps_n
    return dict(kind="gemv_half2", BLOCK_N=block_n, BLOCK_K=block_k, WARPS_K=warps_k, num_warps=warps_n * warps_k,
                num_stages=1, SPLIT_K=split_for(triton.cdiv(N, block_n), K, block_k, waves, device))


def gptq_gemv_half2(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, N: int,
                    config: dict, silu_mul: bool = False, xh: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (silu_mul: [1, 2K] = [gate | up], contiguous) -> [1, N]: gptq_linear_ref's product (of
    silu_mul_ref(gate, up)) in one launch. config: BLOCK_N, BLOCK_K (dividing K and group_size), WARPS_K, SPLIT_K,
    num_warps, num_stages. xh: int32 [K / 2], x's gathered pairs (default: a new scratch; afterwards it holds
    gather_x_half2_ref's words). On CUDA the pair arithmetic is inline PTX; elsewhere (Triton's interpreter)
    emulated in fp16."""
    K = x.shape[1] // 2 if silu_mul else x.shape[1]
    assert x.shape[0] == 1, "the half2 GEMV takes one row"
    assert K % config["BLOCK_K"] == 0 and (group_size >= K or group_size % config["BLOCK_K"] == 0), \
        f"the half2 GEMV needs K tiles that divide K and the group: K {K}, group {group_size}, tile {config['BLOCK_K']}"
    x = x.contiguous()
    xh = torch.empty(K // 2, device=x.device, dtype=torch.int32) if xh is None else xh
    return split_k_launch(_gptq_gemv_half2_kernel, x[:, :K], (perm if perm is not None else x, xh, qweight, scales,
                                                               zeros, qweight.shape[1]), bias, N, 1, config,
                          x_arg=x, BITS=bits, GROUP=group_size, HAS_PERM=perm is not None, SILU_MUL=silu_mul,
                          PTX=x.device.type == "cuda")
