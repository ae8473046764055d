"""LoRA shrink / expand Triton kernels against their torch references, and the references against the
definition y += (x A_slot^T) B_slot^T * scale computed row by row.

CPU: Triton's interpreter at small shapes (fp32, fp16). GPU: Falcon-H1-7B's fused in_proj (Mamba | q | k | v)
and down_proj at rank 16 with 8 adapters, bf16. Tolerance: max |out - ref| / max |ref| < 1e-3 (fp32), 1e-2.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import lora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def case(T, K, slice_sizes, L, R, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S, N = len(slice_sizes), sum(slice_sizes)
    x = torch.randn(T, K, generator=gen).to(dtype).to(DEVICE)
    a = (torch.randn(L, S * R, K, generator=gen) / K ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(L, N, R, generator=gen).to(dtype).to(DEVICE)
    col_slice = torch.repeat_interleave(torch.arange(S, dtype=torch.int32), torch.tensor(slice_sizes)).to(DEVICE)
    slots = torch.randint(-1, L, (T,), generator=gen, dtype=torch.int32).to(DEVICE)
    slots[0], slots[-1] = -1, L - 1  # a row without an adapter and one with, whatever the draw
    out = torch.randn(T, N, generator=gen).to(dtype).to(DEVICE)
    return x, a, b, col_slice, slots, out


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_references_are_the_per_row_definition():
    x, a, b, col_slice, slots, out = case(T=6, K=20, slice_sizes=[5, 7, 3], L=3, R=4, dtype=torch.float64)
    x, a, b, out = x.float().cpu(), a.float().cpu(), b.float().cpu(), out.float().cpu()
    col_slice, slots = col_slice.cpu(), slots.cpu()
    h = lora.lora_shrink_ref(x, a, slots)
    got = lora.lora_expand_ref(h, b, col_slice, slots, out.clone())
    offsets = [0, 5, 12, 15]
    for t in range(6):
        want = out[t].clone()
        if slots[t] >= 0:
            for s in range(3):
                a_s = a[slots[t], s * 4:(s + 1) * 4]  # [R, K]
                b_s = b[slots[t], offsets[s]:offsets[s + 1]]  # [n_s, R]
                want[offsets[s]:offsets[s + 1]] += b_s @ (a_s @ x[t])
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[slots < 0], out[slots < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [dict(T=5, K=24, slice_sizes=[40], L=2, R=8),
                                   dict(T=9, K=130, slice_sizes=[70, 16, 8, 8], L=3, R=6)])
def test_kernels_match_references(shape, dtype):
    x, a, b, col_slice, slots, out = case(dtype=dtype, **shape)
    h_ref = lora.lora_shrink_ref(x, a, slots)
    h = lora.lora_shrink(x, a, slots)
    rows = slots >= 0
    assert h.dtype == torch.float32
    assert rel_err(h[rows], h_ref[rows]) < TOL[dtype]
    ref = lora.lora_expand_ref(h_ref, b, col_slice, slots, out.clone())
    got = lora.lora_expand(h, b, col_slice, slots, out.clone())
    assert got.dtype == dtype
    assert rel_err(got, ref) < TOL[dtype]
    assert torch.equal(got[~rows], out[~rows])  # rows without an adapter are untouched


@pytest.mark.gpu
@pytest.mark.parametrize("slices,K", [([2 * 3072 + 2 * 256 + 24, 1536, 256, 256], 3072), ([3072], 12288)],
                         ids=["in_proj_qkv", "down_proj"])
@pytest.mark.parametrize("T", [1, 32, 500])
def test_kernels_at_falcon_h1_7b_shapes(slices, K, T):
    x, a, b, col_slice, slots, out = case(T=T, K=K, slice_sizes=slices, L=8, R=16, dtype=torch.bfloat16)
    ref = lora.lora_expand_ref(lora.lora_shrink_ref(x, a, slots), b, col_slice, slots, out.clone())
    got = lora.lora_expand(lora.lora_shrink(x, a, slots), b, col_slice, slots, out.clone())
    assert rel_err(got, ref) < TOL[torch.bfloat16]
