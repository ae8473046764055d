"""Triton GPTQ (W4A16 / W8A16) and FP8 weight-only GEMMs against their torch references.

CPU: Triton's interpreter at small shapes, in float32 and float16 (the interpreter mishandles bf16 dots);
every path is exercised: the one-row fp32 and half2 GEMVs (the half2 one's f16x2 inline PTX emulated in fp16
there) and the tensor-core planes GEMM in both orientations (planes to 16 rows, planes_t to 128; its Int4
bf16 / fp16 dequantization is inline PTX: GPU only), split-K (reduced by the last split of each tile) and
not, act-order gather, bias, group sizes 32 / 64 / 128 / one group, and the dequantize-then-cuBLAS path (from
129 rows). GPU: the Falcon-H1-7B / FalconMamba-7B projection shapes in bf16 at decode (1, 16, 32 rows) and
prefill (256, 4096 rows), group 128 with act-order, one group, group 32; the half2 GEMV at its sweep's tiles;
the planes GEMMs in bf16 and fp16 at 2-128 rows and at their sweep's tiles; the fp8 tensor-core path.
Tolerance: max |out - ref| / max |ref| < 1e-4 in fp32, 1e-2 in fp16 / bf16 (one rounding of the output
and of each dequantized weight; the half2 GEMV rounds x to fp16 and its products' fp16 sums), 3e-2 for
fp8 tensor cores (activations are quantized to fp8 too).
"""

from __future__ import annotations

import pytest
import torch

from kernels import fp8_linear as fp8
from kernels import quant_linear as ql
from kernels.quant_linear import gemv_half2 as gh
from kernels.split_k import split_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def random_gptq(K: int, N: int, bits: int, group_size: int, act_order: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(torch.int32)
    qweight = torch.randint(info.min, info.max, (K * bits // 32, N), generator=g, dtype=torch.int32)
    groups = -(-K // group_size)
    scales = (torch.rand(groups, N, generator=g) * 0.02 + 0.005).to(torch.float16 if dtype != torch.float32 else dtype)
    zeros = torch.randint(0, 1 << bits, (groups, N), generator=g).to(torch.int16)
    perm = torch.randperm(K, generator=g).to(torch.int32) if act_order else None
    bias = torch.randn(N, generator=g).to(dtype)
    return [t.to(DEVICE) if t is not None else None for t in (qweight, scales, zeros, perm, bias)]


def check_gptq(M, K, N, bits, group_size, act_order, dtype, with_bias=True, config=None, padded_to=None):
    """padded_to: store the weights with that many columns (garbage beyond N), as layers pad them."""
    N_w = padded_to or N
    group_size = K if group_size == -1 else group_size
    qweight, scales, zeros, perm, bias = random_gptq(K, N_w, bits, group_size, act_order, dtype, seed=M + K + bits)
    bias = bias[:N] if with_bias else None
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, dtype)
    out = ql.gptq_linear(x, qweight, scales, zeros, perm, bias, bits, group_size, N, config=config)
    ref = ql.gptq_linear_ref(x, qweight, scales, zeros, perm, bias, bits, group_size, N)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[dtype]


SMALL = [  # M, K, N, bits, group_size, act_order; one row runs the GEMV kernel, more the tl.dot one
    (1, 256, 64, 4, 128, False),
    (1, 256, 64, 4, 32, True),  # GEMV tiles of one group: BLOCK_K 32
    (1, 320, 48, 8, -1, True),  # one group; the last tile is partial
    (3, 256, 96, 8, 32, True),
    (17, 128, 72, 4, 128, True),
    (2, 192, 40, 4, 192, False),  # one group (group_size -1 resolves to K)
    (4, 256, 64, 4, 64, True),  # groups smaller than the dot's K tile: weights scaled before the dot
    (5, 96, 64, 8, 32, False),
]


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptq_kernel_small(shape, dtype):
    check_gptq(*shape, dtype)


@pytest.mark.parametrize("kind", ["planes", "planes_t"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gptq_kernel_split_k_and_bias(split_k, kind):
    """Split along K, the last split of each tile sums the partials (kernels/split_k.py): 3 row tiles, and
    again in the same launch sequence, so the tile counters must have been left at zero."""
    config = dict(kind=kind, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=split_k, num_warps=4, num_stages=2)
    for _ in range(2):
        check_gptq(37, 512, 48, 4, 128, True, torch.float32, with_bias=split_k == 3, config=config)
    check_gptq(4, 256, 48, 8, 64, False, torch.float32, with_bias=split_k == 1, config=dict(config, BLOCK_K=64))
    gemv = dict(kind="gemv", BLOCK_N=32, BLOCK_K=64, SPLIT_K=split_k, num_warps=4, num_stages=1)
    for _ in range(2):
        check_gptq(1, 256, 48, 4, 64, True, torch.float32, with_bias=split_k == 3, config=gemv)


@pytest.mark.parametrize("split_k", [1, 2])
def test_gptq_kernel_padded_columns(split_k):
    config = dict(kind="planes", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split_k, num_warps=4, num_stages=2)
    check_gptq(3, 256, 72, 4, 128, True, torch.float32, config=config, padded_to=128)
    check_gptq(3, 256, 72, 4, 128, True, torch.float32, config=dict(config, kind="planes_t"), padded_to=128)
    check_gptq(1, 256, 72, 8, 64, True, torch.float32, padded_to=128)
    check_gptq(130, 128, 72, 4, 64, False, torch.float32, padded_to=128)  # dequantize + matmul


def gathered_x_half2(x: torch.Tensor, perm: torch.Tensor | None, bits: int, silu_mul: bool = False,
                     split: int = 3) -> torch.Tensor:
    """The half2 GEMV's scratch after a call: x gathered and paired (each split's share by its programs; 3
    splits of K = 320, the last shorter)."""
    K = x.shape[1] // 2 if silu_mul else x.shape[1]
    qweight, scales, zeros = (torch.zeros(K * bits // 32, 64, dtype=torch.int32, device=DEVICE),
                              torch.ones(1, 64, dtype=torch.float16, device=DEVICE),
                              torch.zeros(1, 64, dtype=torch.int16, device=DEVICE))
    xh = torch.full((K // 2,), -1, dtype=torch.int32, device=DEVICE)
    config = dict(gh.half2_config(64, K, bits, K, torch.device(DEVICE)), SPLIT_K=split)
    gh.gptq_gemv_half2(x, qweight, scales, zeros, perm, None, bits, K, 64, config, silu_mul=silu_mul, xh=xh)
    return xh


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [True, False])
def test_gather_x_half2(bits, act_order):
    """The half2 GEMV's input: x gathered by perm, paired (p, p + pack / 2) per word row, in fp16 times
    2^-(bits + the pair's code position) / X_HEADROOM. Checked against the reference and, unpacked, against x."""
    K, pack = 320, 32 // bits
    x = (torch.randn(1, K, generator=torch.Generator().manual_seed(bits)) * 4).to(DEVICE)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.int32) if act_order else None
    out = gathered_x_half2(x, perm, bits)
    assert torch.equal(out, gh.gather_x_half2_ref(x, perm, bits))
    pairs = out.view(torch.float16).view(K // pack, pack // 2, 2)  # [row, p, (low, high)]
    xg = (x[0, perm] if act_order else x[0]).view(K // pack, pack)
    factor = torch.tensor([2.0 ** -(bits + gh.half2_pair_shift(p % (pack // 2), bits)[1]) / gh.X_HEADROOM.value
                           for p in range(pack)])
    assert torch.equal(pairs.transpose(1, 2).reshape(K // pack, pack), (xg * factor.to(DEVICE)).half())


HALF2_CPU = [  # K, N, bits, group_size, act_order, warps_n, warps_k, rows, split
    (256, 64, 4, 128, False, 1, 1, 4, 1),
    (256, 200, 4, 32, True, 2, 1, 4, 3),   # groups of one tile; N past the stored columns' tile (clamped)
    (320, 48, 8, -1, True, 1, 1, 4, 2),    # one group of K = 320: tiles of 16 channels (10 word rows)
    (512, 72, 8, 128, True, 1, 2, 4, 3),   # warps along K
    (384, 136, 4, 128, True, 1, 4, 8, 2),  # 4 warps along K, 8 rows each: one 128-channel tile a group
    (384, 64, 4, -1, False, 2, 2, 8, 1),   # 128 x 3 tiles, unsplit
]


@pytest.mark.parametrize("K, N, bits, group_size, act_order, warps_n, warps_k, rows, split", HALF2_CPU)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_half2_gemv_small(K, N, bits, group_size, act_order, warps_n, warps_k, rows, split, dtype):
    """The half2 GEMV (kernels/quant_linear/gemv_half2.py) at small shapes, its f16x2 steps emulated in fp16 on
    the CPU (inline PTX on a GPU): 4 / 8 bits, act-order or not, groups 128 / 32 / one, 1-2 warps along the
    columns and 1-4 along K, split or not, bias; the stored columns padded to 64; twice (the split counters
    reset)."""
    group = K if group_size == -1 else group_size
    config = dict(gh.half2_config(N, K, bits, group, torch.device(DEVICE), warps_n, warps_k, rows), SPLIT_K=split)
    assert K % config["BLOCK_K"] == 0 and group % config["BLOCK_K"] == 0
    for _ in range(2):
        check_gptq(1, K, N, bits, group_size, act_order, dtype, config=config, padded_to=-(-N // 64) * 64)


def test_gptq_half2_config_divides_k_and_group():
    """BLOCK_K halves until it divides K and the group (one tile in one group, no partial tile)."""
    dev = torch.device(DEVICE)
    assert gh.half2_config(8728, 3072, 4, 128, dev)["BLOCK_K"] == 32
    assert gh.half2_config(64, 3072, 4, 128, dev, rows=32)["BLOCK_K"] == 128
    assert gh.half2_config(64, 3080, 4, 3080, dev)["BLOCK_K"] == 8  # 3080 = 8 x 385
    assert gh.half2_config(64, 256, 8, 32, dev, warps_k=2, rows=8)["BLOCK_K"] == 32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("block_k", [128, 256])
def test_gather_x_planes_kernel(bits, act_order, block_k):
    """The planes GEMM's input: x gathered by perm, each block_k tile's columns in plane order (column
    j rows + r holds channel pack r + j), zeros past K (320: the last tile partial). Checked against the
    reference and, column by column, against x itself."""
    M, K, pack = 3, 320, 32 // bits
    rows = block_k // pack
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(bits)).to(DEVICE)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.int32) if act_order else None
    out = ql.gather_x_planes(x, perm, bits, block_k)
    assert torch.equal(out, ql.gather_x_planes_ref(x, perm, bits, block_k))
    xg = x[:, perm] if act_order else x
    c = torch.arange(out.shape[1])
    tile, i = c // block_k, c % block_k
    k = tile * block_k + pack * (i % rows) + i // rows
    assert out.shape[1] == -(-K // block_k) * block_k
    assert torch.equal(out[:, k < K], xg[:, k[k < K]]) and not out[:, k >= K].any()


PLANES_GROUPS = [(128, True), (32, False), (-1, True), (128, False)]  # group_size, act_order


@pytest.mark.parametrize("M", [2, 17, 33])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, act_order", PLANES_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptq_planes_kernel_small(M, bits, group_size, act_order, dtype):
    """The planes GEMMs' defaults (planes to 16 rows, planes_t to 128) under the interpreter: 4 and 8 bits,
    act-order and not, group 128 (a K tile in one group), 32 (weights scaled before the dots), one group;
    K = 320 (the last K tile partial), 72 of 128 stored columns, the default split. fp16, not bf16: the
    interpreter's bf16 dots are wrong (the inline-PTX bf16 / fp16 dequantization runs in the GPU tests)."""
    assert ql.matmul_config(M, 72, 320, bits, group_size, torch.device(DEVICE))["kind"] == \
        ("planes" if M <= 16 else "planes_t")
    check_gptq(M, 320, 72, bits, group_size, act_order, dtype, padded_to=128)


def planes_t_config(M: int, **tiles) -> dict:
    """The default planes tiles (BLOCK_M: the rows' power of two, at least 16) as kind planes_t."""
    return dict(ql.matmul_config(min(M, ql.DEQUANT_MATMUL_MIN_ROWS - 1), 200, 640, 4, 128, torch.device(DEVICE)),
                kind="planes_t", BLOCK_M=max(16, 1 << (M - 1).bit_length()), **tiles)


@pytest.mark.parametrize("M, block_m", [(2, 16), (33, 64), (70, 128), (130, 64)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, act_order", PLANES_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptq_planes_t_kernel_small(M, block_m, bits, group_size, act_order, dtype):
    """The transposed planes GEMM (kind planes_t: out^T = W^T @ x^T per plane) under the interpreter: as
    test_gptq_planes_kernel_small, and past 64 rows (one tile of 128 rows; 3 tiles of 64 along M)."""
    config = dict(planes_t_config(M), BLOCK_M=block_m, SPLIT_K=2)
    check_gptq(M, 320, 72, bits, group_size, act_order, dtype, padded_to=128, config=config)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_dequantize_kernel(bits):
    qweight, scales, zeros, _, _ = random_gptq(256, 80, bits, 64, False, torch.float32)
    out = ql.gptq_dequantize(qweight, scales, zeros, bits, 64, torch.float32)
    assert torch.equal(out, ql.dequantize_ref(qweight, scales, zeros, bits, 64))


def test_gptq_long_inputs_use_the_dequantized_matmul(monkeypatch):
    monkeypatch.setattr(ql, "DEQUANT_MATMUL_MIN_ROWS", 8)
    assert ql.matmul_config(9, 64, 128, 4, 32, torch.device(DEVICE)) == dict(kind="dequant")
    check_gptq(9, 128, 64, 4, 32, True, torch.float32)


FP8_CONFIGS = [dict(kind="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3, num_warps=4, num_stages=2),
               # the GEMV, its last tile partial
               dict(kind="gemv", BLOCK_N=32, BLOCK_K=32, VEC=fp8.GEMV_VEC, SPLIT_K=3, num_warps=4, num_stages=1),
               dict(kind="gemv", BLOCK_N=64, BLOCK_K=64, VEC=fp8.GEMV_VEC, SPLIT_K=1, num_warps=4, num_stages=1),
               None]  # the heuristic's


@pytest.mark.parametrize("config", FP8_CONFIGS)
@pytest.mark.parametrize("M", [1, 5])
def test_fp8_weight_only_kernel(M, config):
    """Both weight-only kernels (tl.dot tiles; the GEMV, which takes any number of rows, one per program),
    split along K or not, 72 output rows (a partial column tile), bias; twice, so the split counters reset."""
    g = torch.Generator().manual_seed(M)
    w, scale = fp8.quantize_fp8_weight(torch.randn(72, 160, generator=g) * 0.05)
    x = torch.randn(M, 160, generator=g)
    bias = torch.randn(72, generator=g)
    w, scale, x, bias = (t.to(DEVICE) for t in (w, scale, x, bias))
    for _ in range(2):
        out = fp8.fp8_weight_only_linear(x, w, scale, bias, config=config)
        assert rel_err(out, fp8.fp8_linear_ref(x, w, scale, bias)) < TOL[torch.float32]


def test_fp8_activation_quantization_kernel():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    q, scale = fp8.quantize_fp8_rows(x)
    q_ref, scale_ref = fp8.quantize_fp8_rows_ref(x)
    assert torch.allclose(scale, scale_ref, rtol=1e-6) and scale.shape == (5, 1)
    # Triton's interpreter converts fp32 -> e4m3 wrongly (124.0 -> 64.0): the codes are checked on the GPU only
    if DEVICE == "cuda":
        assert torch.equal(q.float(), q_ref.float())


def test_fp8_quantization_round_trip():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    q, scale = fp8.quantize_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))  # each row's max hits the range
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 above the subnormal range
    big = w.abs() > scale[:, None] * 2**-6
    assert ((q.float() * scale[:, None] - w).abs()[big] / w.abs()[big]).max() <= 2**-4 + 1e-6


# Falcon-H1-7B: fused in_proj+qkv, o/out_proj, fused gate+up, down; FalconMamba-7B: in_proj, out_proj.
GPU_SHAPES = [(3072, 8728),  # N % 16 = 8: the fp8 tensor-core path leaves 8 rows to the weight-only kernel
              (3072, 3072), (3072, 24576), (12288, 3072), (4096, 16384), (8192, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", GPU_SHAPES)
@pytest.mark.parametrize("M", [1, 32, 256, 4096])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_kernel_gpu(K, N, M, bits):
    check_gptq(M, K, N, bits, 128, True, torch.bfloat16, padded_to=-(-N // 64) * 64)


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", [(3072, 8728), (12288, 3072), (8192, 4096)])
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, act_order", [(-1, False), (32, True)])
def test_gptq_kernel_gpu_group_sizes(K, N, M, bits, group_size, act_order):
    """One group over all of K, and groups smaller than the tensor-core path's K tile (scaled before the dot)."""
    check_gptq(M, K, N, bits, group_size, act_order, torch.bfloat16, padded_to=-(-N // 64) * 64)


# benchmarks/quant.py GEMM_SHAPES: Falcon-H1-7B's and FalconMamba-7B's projections
PLANES_GPU_SHAPES = [(3072, 8728), (3072, 3072), (1536, 3072), (4608, 3072), (3072, 24576), (12288, 3072),
                     (4096, 16384), (8192, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", PLANES_GPU_SHAPES)
@pytest.mark.parametrize("M", [2, 17, 32, 64, 65, 128])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptq_planes_kernel_gpu(K, N, M, bits, dtype):
    """The planes GEMMs at the 7B shapes with the default kinds and tiles, Int4 through the inline-PTX bf16x2 /
    f16x2 dequantization (group 128, act-order)."""
    assert ql.matmul_config(M, N, K, bits, 128, torch.device("cuda"))["kind"] == ("planes" if M <= 16 else "planes_t")
    check_gptq(M, K, N, bits, 128, True, dtype, padded_to=-(-N // 64) * 64)


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", PLANES_GPU_SHAPES)
@pytest.mark.parametrize("M", [2, 17, 32, 64, 128, 256])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_planes_t_kernel_gpu(K, N, M, bits):
    """The transposed planes GEMM at the 7B shapes, default tiles but BLOCK_M (to 128 rows a tile: 256 spill
    the two fp32 accumulators), bf16, group 128, act-order; Int4 through the inline-PTX dequantization."""
    check_gptq(M, K, N, bits, 128, True, torch.bfloat16, padded_to=-(-N // 64) * 64,
               config=dict(planes_t_config(min(M, 128)), SPLIT_K=4))


PLANES_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),
                  dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=3),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3)]  # 4 stages: Int8 over 227 KB


@pytest.mark.gpu
@pytest.mark.parametrize("config", PLANES_CONFIGS)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, act_order", PLANES_GROUPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["planes", "planes_t"])
def test_gptq_planes_kernel_gpu_small(config, split_k, bits, group_size, act_order, dtype, kind):
    """Both planes GEMMs (kinds planes, planes_t) at the sweep's tiles at small shapes: K = 640 (the last K
    tile partial at BLOCK_K 256), 200 of 256 stored columns, 37 rows, split or not, each group layout; twice
    (the split counters reset). Int4 at groups of whole tiles runs the inline-PTX dequantization (bf16 from
    sm_90)."""
    ptx = bits == 4 and (dtype == torch.float16 or torch.cuda.get_device_capability() >= (9, 0))
    assert ql._ptx_dequant(torch.device("cuda"), dtype, bits) == ptx
    for _ in range(2):
        check_gptq(37, 640, 200, bits, group_size, act_order, dtype, padded_to=256,
                   config=dict(config, kind=kind, SPLIT_K=split_k))


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", GPU_SHAPES)
@pytest.mark.parametrize("M", [1, 32, 256, 4096])
def test_fp8_kernel_gpu(K, N, M):
    g = torch.Generator().manual_seed(M)
    w, scale = fp8.quantize_fp8_weight(torch.randn(N, K, generator=g) * 0.02)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w, scale, x = w.cuda(), scale.cuda(), x.cuda()
    out = fp8.fp8_linear(x, w, scale, None)
    tol = 3e-2 if M >= fp8.SCALED_MM_MIN_ROWS else TOL[torch.bfloat16]
    assert rel_err(out, fp8.fp8_linear_ref(x, w, scale, None)) < tol


HALF2_SMALL = [(256, 64, 4, 128, False), (256, 64, 4, 32, True), (320, 48, 8, -1, True), (512, 72, 8, 128, True),
               (384, 200, 4, 128, True)]  # K, N, bits, group_size, act_order


@pytest.mark.gpu
@pytest.mark.parametrize("K, N, bits, group_size, act_order", HALF2_SMALL)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_half2_gemv_gpu_small(K, N, bits, group_size, act_order, split_k, dtype):
    """The half2 GEMV (inline PTX: GPU only) at small shapes: 4 and 8 bits, act-order and not, group 128 / 32 /
    one group, N not a multiple of the tile, K not a multiple of the split; twice (the split counters reset)."""
    group = K if group_size == -1 else group_size
    config = dict(gh.half2_config(N, K, bits, group, torch.device("cuda")), SPLIT_K=split_k)
    for _ in range(2):
        check_gptq(1, K, N, bits, group_size, act_order, dtype, config=config, padded_to=-(-N // 64) * 64)


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", GPU_SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["gemv", "gemv_half2"])
def test_gptq_gemv_kinds_gpu(K, N, bits, kind):
    """Both one-row kernels (the fp32 GEMV kept as a candidate) at the real shapes with their default tiles."""
    dev = torch.device("cuda")
    if kind == "gemv":
        config = dict(kind="gemv", BLOCK_N=64, BLOCK_K=128, num_warps=2, num_stages=1,
                      SPLIT_K=split_for(-(-N // 64), K, 128, 4, dev))
    else:
        config = gh.half2_config(N, K, bits, 128, dev)
    check_gptq(1, K, N, bits, 128, True, torch.bfloat16, padded_to=-(-N // 64) * 64, config=config)


HALF2_GPU_CONFIGS = [(2, 1, 4, 8), (1, 1, 4, 16), (4, 1, 4, 4), (2, 1, 8, 8), (2, 2, 4, 4), (1, 4, 4, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", PLANES_GPU_SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("warps_n, warps_k, rows, waves", HALF2_GPU_CONFIGS)
def test_gptq_half2_gemv_gpu(K, N, bits, warps_n, warps_k, rows, waves):
    """The half2 GEMV at the sweep's tiles (benchmarks/quant.py gptq_candidates) at the 7B shapes, group 128,
    act-order, bf16 x (fp16 in test_gptq_half2_gemv_gpu_small)."""
    config = gh.half2_config(N, K, bits, 128, torch.device("cuda"), warps_n, warps_k, rows, waves)
    check_gptq(1, K, N, bits, 128, True, torch.bfloat16, padded_to=-(-N // 64) * 64, config=config)
