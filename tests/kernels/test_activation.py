"""Triton SiLU(gate) * up against its reference, on strided views of one matmul output like the MLP's."""

import pytest
import torch

from kernels.activation import silu_mul, silu_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(rows: int, cols: int, dtype: torch.dtype, tol: float) -> None:
    fused = torch.randn(rows, 2 * cols, generator=torch.Generator().manual_seed(rows + cols)).to(DEVICE, dtype)
    gate, up = fused.chunk(2, dim=-1)  # non-contiguous rows, as in the model
    out, ref = silu_mul(gate, up), silu_mul_ref(gate, up)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < tol


@pytest.mark.parametrize("rows, cols", [(1, 7), (3, 96), (5, 1500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_small(rows, cols, dtype):
    check(rows, cols, dtype, 1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, cols", [(1, 12288), (256, 12288), (4096, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_gpu(rows, cols, dtype):
    check(rows, cols, dtype, 1e-6 if dtype == torch.float32 else 1e-2)
