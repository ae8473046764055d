"""The one-row FP8 GEMV that keeps a partial per (row, lane) (kernels/fp8_linear.py _fp8_gemv_kernel)
against fp8_linear_ref.

CPU: Triton's interpreter in float32 at small shapes: N and K not multiples of the tiles (K not even a
multiple of the 8- or 16-byte vector; K % 4 == 0, W is read in 32-bit words), split along K or not (the last
split shorter than the others), bias or none, 1 / 5 / 16 / 32 rows (one program per row), with Triton's
fp8 conversion (the interpreter runs no PTX: the packed cvt is checked on the GPU). GPU: the
Falcon-H1-7B / FalconMamba-7B projection shapes in bf16 at one row, every tile shape and vector width the sweep tries.
Tolerance: max |out - ref| / max |ref| < 1e-4 in fp32, 1e-2 in bf16 (one rounding of the output).
"""

from __future__ import annotations

import pytest
import torch

from kernels import fp8_linear as fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def random_fp8(M: int, K: int, N: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w, scale = fp8.quantize_fp8_weight(torch.randn(N, K, generator=g) * 0.05)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (x, w, scale, bias)]


def gemv_test_config(block_n: int, block_k: int, split_k: int, num_warps: int = 1, vec: int = fp8.GEMV_VEC) -> dict:
    return dict(kind="gemv", BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec, SPLIT_K=split_k,
                num_warps=num_warps, num_stages=1)


@pytest.mark.parametrize("M", [1, 5, 16, 32])
@pytest.mark.parametrize("K, N, config", [
    (300, 72, gemv_test_config(16, 64, 3)),  # 5 K tiles in splits of 2, 2, 1; the last tile and column tile partial
    (300, 72, gemv_test_config(8, 128, 1)),  # one split, three tiles
    (164, 20, gemv_test_config(32, 256, 1)),  # one tile (no loop), K % 8 = 4, fewer rows than the tile
    (256, 40, gemv_test_config(8, 64, 4)),  # every split one full tile
    (300, 72, gemv_test_config(4, 128, 2, vec=16)),  # 16 bytes a thread: 3 tiles in splits of 2, 1; K % 16 = 12
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_gemv_kernel(M, K, N, config, with_bias):
    """Twice, so the split counters are back at zero for the second call."""
    x, w, scale, bias = random_fp8(M, K, N, torch.float32, seed=M + K + N)
    bias = bias if with_bias else None
    ref = fp8.fp8_linear_ref(x, w, scale, bias)
    for _ in range(2):
        out = fp8.fp8_weight_only_linear(x, w, scale, bias, config=config)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < 1e-4


def test_fp8_gemv_kernel_needs_whole_words():
    x, w, scale, _ = random_fp8(1, 162, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        fp8.fp8_weight_only_linear(x, w, scale, None, config=gemv_test_config(8, 64, 1))


def test_gemv_config_spreads_warps_along_k():
    config = fp8.gemv_config(3072, 3072, block_n=8, num_warps=4, waves=4, device=torch.device("cpu"))
    assert config["BLOCK_K"] == 8 * 32 * 4 and config["kind"] == "gemv"
    assert 1 <= config["SPLIT_K"] <= 3  # K has 3 tiles of 1024


@pytest.mark.parametrize("K, N, kind, block_n, vec", [
    (3072, 8728, "gemv", 4, 8),  # below 2^25 codes: 4 rows a program, 8 bytes a thread
    (12288, 3072, "gemv", 2, 16),  # N <= K (the 7B's down): 2 rows, 16 bytes
    (8192, 4096, "gemv", 2, 16),  # FalconMamba's out_proj
    (3072, 24576, "gemm", None, None),  # wide (gate+up, FalconMamba's in_proj): the tl.dot kernel
    (4096, 16384, "gemm", None, None),
])
def test_weight_only_config_at_one_row_is_the_sweeps_best(K, N, kind, block_n, vec):
    """The H200 sweep's choices (RESULTS.md, session 15) as weight_only_config makes them; more rows: tl.dot."""
    config = fp8.weight_only_config(1, N, K, torch.device("cpu"))
    assert config["kind"] == kind
    if kind == "gemv":
        assert (config["BLOCK_N"], config["VEC"]) == (block_n, vec)
    assert fp8.weight_only_config(2, N, K, torch.device("cpu"))["kind"] == "gemm"


# Falcon-H1-7B: fused in_proj+qkv, out_proj, o_proj, fused gate+up, down; FalconMamba-7B: in_proj, out_proj.
GPU_SHAPES = [(3072, 8728), (3072, 3072), (1536, 3072), (3072, 24576), (12288, 3072), (4096, 16384), (8192, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", GPU_SHAPES)
@pytest.mark.parametrize("block_n, num_warps", [(2, 4), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4), (8, 8), (16, 8)])
@pytest.mark.parametrize("waves", [4, 8])
@pytest.mark.parametrize("vec", [8, 16])
def test_fp8_gemv_gpu(K, N, block_n, num_warps, waves, vec):
    x, w, scale, _ = random_fp8(1, K, N, torch.bfloat16, seed=K + N)
    config = fp8.gemv_config(N, K, block_n, num_warps, waves, x.device, vec)
    out = fp8.fp8_weight_only_linear(x, w, scale, None, config=config)
    assert rel_err(out, fp8.fp8_linear_ref(x, w, scale, None)) < 1e-2
