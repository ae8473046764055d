"""kernels/gemv.py against its torch reference: the interpreter in fp32 at small shapes, the GPU at real ones."""

import pytest
import torch

from kernels.gemv import gemv, gemv_config, gemv_ref

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("M, N, K, block_n, warps, split", [
    (1, 20, 300, 8, 1, 1),    # N below a tile, K not a multiple of BLOCK_K
    (1, 72, 1000, 8, 2, 2),   # uneven split: 2 + 2 tiles of 512 (last partial)
    (3, 40, 256, 16, 1, 3),   # several rows, one tile a split
    (1, 33, 1536, 4, 1, 4),   # more splits than needed to tile K evenly
])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_reference(M, N, K, block_n, warps, split, bias):
    dev = "cuda" if CUDA else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, generator=gen)
    w = torch.randn(N, K, device=dev, generator=gen)
    b = torch.randn(N, device=dev, generator=gen) if bias else None
    cfg = dict(BLOCK_N=block_n, BLOCK_K=8 * 32 * warps, num_warps=warps, num_stages=1, SPLIT_K=split)
    for _ in range(2):  # the split-K counters must be reset by the first call
        torch.testing.assert_close(gemv(x, w, b, config=cfg), gemv_ref(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("K, N", [(1024, 4120), (1536, 1024), (512, 1024), (1024, 4096), (2048, 1024),
                                  (3072, 3072), (1536, 3072), (12288, 3072)])
def test_gemv_bf16_at_projection_shapes(K, N):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, K, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    b = torch.randn(N, device="cuda", generator=gen).to(torch.bfloat16)
    ref = gemv_ref(x, w, b)
    for cfg in (gemv_config(N, K, x.device), gemv_config(N, K, x.device, block_n=4, num_warps=2, waves=8)):
        torch.testing.assert_close(gemv(x, w, b, config=cfg), ref, rtol=1e-2, atol=1e-2)
