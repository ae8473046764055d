"""Triton RMSNorm / fused add + RMSNorm / split weightless RMSNorm / grouped gated RMSNorm against their torch
references.

CPU: Triton's interpreter at small shapes, in fp32 and fp16 (the interpreter truncates fp32 -> bf16 instead of
rounding, so bf16 runs on the GPU only). GPU: Falcon-H1 / FalconMamba widths in bf16 and fp32.
Tolerances (max |out - ref| / max |ref|): fp32 < 1e-3, fp16 / bf16 < 1e-2; output dtypes must match exactly.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
EPS = 1e-5



def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 2 + 0.3).to(dtype).to(DEVICE)


def weight(n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen) + 0.5).to(dtype).to(DEVICE)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOL[ref.dtype], err


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(37, 48), (1, 256), (3, 5, 24), (70, 16)])
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, ...]):
    x = rand(*shape, dtype=dtype, seed=len(shape))
    w = weight(shape[-1], dtype)
    assert_close(norm.rms_norm(x, w, EPS), norm.rms_norm_ref(x, w, EPS))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("sizes", [[6, 8, 8], [20, 3, 1], [1, 1, 1]])
def test_split_rms_norm(dtype: torch.dtype, sizes: list[int]):
    """FalconMamba's weightless norms of dt / B / C in one launch, on a column slice (row stride > width)."""
    wide = rand(29, sum(sizes) + 5, dtype=dtype, seed=sum(sizes))
    proj = wide[:, 2: 2 + sum(sizes)]
    assert_close(norm.split_rms_norm(proj, sizes, 1e-6), norm.split_rms_norm_ref(proj, sizes, 1e-6))


def test_split_rms_norm_segments_are_independent():
    """Scaling one segment of a row leaves the other two segments' outputs exactly as they were."""
    x = rand(8, 22, seed=11)
    scaled = x.clone()
    scaled[:, 6:14] *= 100
    out, out_scaled = norm.split_rms_norm(x, [6, 8, 8], 1e-6), norm.split_rms_norm(scaled, [6, 8, 8], 1e-6)
    assert torch.equal(out[:, :6], out_scaled[:, :6]) and torch.equal(out[:, 14:], out_scaled[:, 14:])
    assert_close(out_scaled[:, 6:14], out[:, 6:14])


def test_rms_norm_mixed_dtypes():
    """fp16 activations with an fp32 weight promote to fp32, like torch."""
    x = rand(9, 40, dtype=torch.float16, seed=4)
    w = weight(40, torch.float32)
    assert_close(norm.rms_norm(x, w, EPS), norm.rms_norm_ref(x, w, EPS))


@pytest.mark.parametrize("x_dtype,res_dtype,w_dtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.float16, torch.float32, torch.float16),  # residual kept in fp32
])
@pytest.mark.parametrize("shape", [(33, 48), (2, 3, 100)])
def test_add_rms_norm(x_dtype: torch.dtype, res_dtype: torch.dtype, w_dtype: torch.dtype, shape: tuple[int, ...]):
    x = rand(*shape, dtype=x_dtype, seed=5)
    residual = rand(*shape, dtype=res_dtype, seed=6)
    w = weight(shape[-1], w_dtype)
    out, h = norm.add_rms_norm(x, residual, w, EPS)
    out_ref, h_ref = norm.add_rms_norm_ref(x, residual, w, EPS)
    assert_close(out, out_ref)
    assert torch.equal(h, h_ref)


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_add_two_deltas_rms_norm(x_dtype: torch.dtype, res_dtype: torch.dtype):
    """Falcon-H1's Mamba + attention outputs added to the residual by the norm (strided deltas, as split views);
    h is exactly residual + (x + x2), the sum rounded to x's dtype first, as the unfused layer computes it."""
    both = rand(19, 2 * 64, dtype=x_dtype, seed=11)
    x, x2 = both[:, :64], both[:, 64:]
    residual = rand(19, 64, dtype=res_dtype, seed=12)
    w = weight(64, x_dtype)
    out, h = norm.add_rms_norm(x, residual, w, EPS, x2)
    out_ref, h_ref = norm.add_rms_norm_ref(x, residual, w, EPS, x2)
    assert_close(out, out_ref)
    assert torch.equal(h, h_ref)
    assert torch.equal(h_ref, residual + (x + x2).to(res_dtype))
    assert not torch.equal(h, norm.add_rms_norm(x, residual, w, EPS)[1])  # the second delta is really added


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n_groups", [1, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm(dtype: torch.dtype, n_groups: int, norm_before_gate: bool):
    zy = rand(21, 2 * 96, dtype=dtype, seed=n_groups)
    z, y = zy[:, :96], zy[:, 96:]  # slices of the in_proj output, as in the Mamba2 mixer
    w = weight(96, dtype)
    assert_close(norm.gated_rms_norm(y, z, w, EPS, n_groups, norm_before_gate),
                 norm.gated_rms_norm_ref(y, z, w, EPS, n_groups, norm_before_gate))


# ----------------------------------------------------------------------------------------------------------------
# GPU: hidden sizes (0.5B 1024, 7B 3072, 34B 5120), d_ssm / groups of the Mamba2 norm, FalconMamba's dt rank
# and state size for the weightless norms.
# ----------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1024), (256, 3072), (4096, 3072), (777, 5120)])
def test_rms_norms_gpu(dtype: torch.dtype, rows: int, cols: int):
    x, residual = rand(rows, cols, dtype=dtype, seed=7), rand(rows, cols, dtype=dtype, seed=8)
    w = weight(cols, dtype)
    assert_close(norm.rms_norm(x, w, EPS), norm.rms_norm_ref(x, w, EPS))
    out, h = norm.add_rms_norm(x, residual, w, EPS)
    out_ref, h_ref = norm.add_rms_norm_ref(x, residual, w, EPS)
    assert_close(out, out_ref)
    assert torch.equal(h, h_ref)
    out, h = norm.add_rms_norm(x, residual.float(), w, EPS)
    out_ref, h_ref = norm.add_rms_norm_ref(x, residual.float(), w, EPS)
    assert_close(out, out_ref)
    assert torch.equal(h, h_ref)
    x2 = rand(rows, cols, dtype=dtype, seed=10)  # Falcon-H1: Mamba + attention deltas, summed by the norm
    out, h = norm.add_rms_norm(x, residual, w, EPS, x2)
    out_ref, h_ref = norm.add_rms_norm_ref(x, residual, w, EPS, x2)
    assert_close(out, out_ref)
    assert torch.equal(h, h_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 2048])
def test_split_rms_norm_gpu(dtype: torch.dtype, rows: int):
    """FalconMamba-7B's x_proj output: dt rank 256, state size 16."""
    proj = rand(rows, 256 + 16 + 16, dtype=dtype, seed=9)
    assert_close(norm.split_rms_norm(proj, [256, 16, 16], 1e-6), norm.split_rms_norm_ref(proj, [256, 16, 16], 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("d_ssm,n_groups", [(1536, 1), (3072, 1), (4096, 2)])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_gpu(dtype: torch.dtype, d_ssm: int, n_groups: int, norm_before_gate: bool):
    zy = rand(1000, 2 * d_ssm, dtype=dtype, seed=10)
    z, y = zy[:, :d_ssm], zy[:, d_ssm:]
    w = weight(d_ssm, dtype)
    assert_close(norm.gated_rms_norm(y, z, w, EPS, n_groups, norm_before_gate),
                 norm.gated_rms_norm_ref(y, z, w, EPS, n_groups, norm_before_gate))
