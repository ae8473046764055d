"""LoRA shrink / expand Triton kernels against their torch references, and the references against the
definition y[t] += B_slot(t) (A_slot(t) x[t]) per output slice, row by row.

CPU: Triton's interpreter at small shapes (fp32, fp16), with more rows per adapter than one row block,
split K (decode-sized batches) and one K range (prefill-sized). GPU: Falcon-H1-7B's fused in_proj
(Mamba | q | k | v) and down_proj at rank 16 with 8 adapters, bf16, decode and prefill row counts, and
replay in a CUDA graph. Tolerance: max |out - ref| / max |ref| < 1e-3 (fp32), 1e-2 (16-bit).
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
    starts = torch.tensor([sum(slice_sizes[:i]) for i in range(S + 1)], dtype=torch.int32, device=DEVICE)
    slots = torch.randint(-1, L, (T,), generator=gen, dtype=torch.int32)
    slots[0], slots[-1] = -1, L - 1  # a row without an adapter and one with, whatever the draw
    out = torch.randn(T, N, generator=gen).to(dtype).to(DEVICE)
    return x, a, b, starts, max(slice_sizes), lora.group_rows(slots.to(DEVICE), L), out


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_group_rows():
    rows = lora.group_rows(torch.tensor([2, -1, 0, 2, 0, -1, 1], dtype=torch.int32), 4)
    assert rows.sorted_rows.tolist() == [2, 4, 6, 0, 3, 1, 5]
    assert rows.slot_starts.tolist() == [0, 2, 3, 5, 5]
    assert rows.block_slot.tolist() == [0, 1, 2, -1, -1] and rows.block_start.tolist()[:3] == [0, 2, 3]
    many = lora.group_rows(torch.tensor([1] * 40 + [0] * 3, dtype=torch.int32), 2)  # 16-row blocks
    assert many.block_slot.tolist() == [0, 1, 1, 1, -1] and many.block_start.tolist()[:4] == [0, 3, 19, 35]


def test_references_are_the_per_row_definition():
    x, a, b, starts, widest, rows, out = case(T=6, K=20, slice_sizes=[5, 7, 3], L=3, R=4, dtype=torch.float32)
    got = lora.lora_expand_ref(lora.lora_shrink_ref(x, a, rows), b, starts, widest, rows, out.clone())
    bounds = starts.tolist()
    for t in range(6):
        slot, want = int(rows.row_slots[t]), out[t].clone()
        if slot >= 0:
            for s in range(3):
                a_s = a[slot, s * 4:(s + 1) * 4]  # [R, K]
                want[bounds[s]:bounds[s + 1]] += b[slot, bounds[s]:bounds[s + 1]] @ (a_s @ x[t])
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[rows.row_slots < 0], out[rows.row_slots < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [dict(T=5, K=24, slice_sizes=[40], L=2, R=8),
                                   dict(T=60, K=600, slice_sizes=[70, 16, 8, 8], L=2, R=6),
                                   dict(T=300, K=40, slice_sizes=[24, 8], L=3, R=4)],
                         ids=["one_slice", "four_slices_split_k", "prefill_rows"])
def test_kernels_match_references(shape, dtype):
    x, a, b, starts, widest, rows, out = case(dtype=dtype, **shape)
    h_ref = lora.lora_shrink_ref(x, a, rows)
    h = lora.lora_shrink(x, a, rows)
    has = rows.row_slots >= 0
    assert h.dtype == torch.float32 and h_ref.shape[0] == 1
    assert rel_err(h.sum(0)[has], h_ref[0, has]) < TOL[dtype]
    ref = lora.lora_expand_ref(h_ref, b, starts, widest, rows, out.clone())
    got = lora.lora_expand(h, b, starts, widest, rows, out.clone())
    assert got.dtype == dtype
    assert rel_err(got, ref) < TOL[dtype]
    assert torch.equal(got[~has], out[~has])  # rows without an adapter are untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expand_of_every_slots_h_matches_the_shrink_path(dtype):
    """The stacked-weight path: h_all = x [A_0; ...; A_{L-1}]^T for every slot, the expand picks row t's
    slot at slot_t * S*R; same result as shrink + expand."""
    x, a, b, starts, widest, rows, out = case(T=40, K=48, slice_sizes=[24, 8, 8], L=3, R=4, dtype=dtype)
    h_all = (x.float() @ a.flatten(0, 1).float().t()).to(dtype)  # [T, L*S*R], as the base matmul gives it
    want = lora.lora_expand_ref(lora.lora_shrink_ref(x, a, rows), b, starts, widest, rows, out.clone())
    ref = lora.lora_expand_ref(h_all[None], b, starts, widest, rows, out.clone(), slot_stride=a.shape[1])
    got = lora.lora_expand(h_all[None], b, starts, widest, rows, out.clone(), slot_stride=a.shape[1])
    assert rel_err(ref, want) < TOL[dtype] and rel_err(got, want) < TOL[dtype]
    assert torch.equal(got[rows.row_slots < 0], out[rows.row_slots < 0])


@pytest.mark.gpu
@pytest.mark.parametrize("slices,K", [([2 * 3072 + 2 * 256 + 24, 1536, 256, 256], 3072), ([3072], 12288)],
                         ids=["in_proj_qkv", "down_proj"])
@pytest.mark.parametrize("T", [1, 32, 2000])
def test_kernels_at_falcon_h1_7b_shapes(slices, K, T):
    x, a, b, starts, widest, rows, out = case(T=T, K=K, slice_sizes=slices, L=8, R=16, dtype=torch.bfloat16)
    ref = lora.lora_expand_ref(lora.lora_shrink_ref(x, a, rows), b, starts, widest, rows, out.clone())
    got = lora.lora_expand(lora.lora_shrink(x, a, rows), b, starts, widest, rows, out.clone())
    assert rel_err(got - out, ref - out) < 2e-2  # the delta itself, not hidden under out
    h_all = x @ a.flatten(0, 1).t()  # the stacked-weight path: every slot's shrink from one bf16 matmul
    stacked = lora.lora_expand(h_all[None], b, starts, widest, rows, out.clone(), slot_stride=a.shape[1])
    assert rel_err(stacked - out, ref - out) < 2e-2


@pytest.mark.gpu
def test_kernels_replay_in_a_cuda_graph():
    """Captured once with no adapter rows; replayed with others: the graph reads the slots at replay."""
    x, a, b, starts, widest, _, out = case(T=8, K=256, slice_sizes=[64, 32], L=4, R=16, dtype=torch.bfloat16)
    slots = torch.full((8,), -1, dtype=torch.int32, device=DEVICE)
    base = out.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(base)
        rows = lora.group_rows(slots, 4)
        lora.lora_expand(lora.lora_shrink(x, a, rows), b, starts, widest, rows, out)
    slots.copy_(torch.tensor([0, 3, -1, 1, 1, 2, -1, 0], dtype=torch.int32))
    graph.replay()
    fresh = lora.group_rows(slots.clone(), 4)
    ref = lora.lora_expand_ref(lora.lora_shrink_ref(x, a, fresh), b, starts, widest, fresh, base.clone())
    assert rel_err(out - base, ref - base) < 2e-2
