"""Mamba2 chunked SSD scan (Triton) against its torch reference: interpreted on CPU at small shapes
(TRITON_INTERPRET=1), compiled on a GPU at the published Falcon-H1 shapes."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import ssd_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAD = -1
NO_LIMIT = (0.0, math.inf)

# (sequence lengths, has_initial_state, state slots) for chunk 8; slot -1 is a padded sequence.
LAYOUTS = [
    ([1], [True], [2]),
    ([3, 1, 5], [True, False, True], [4, 0, 1]),  # all shorter than a chunk
    ([40], [True], [0]),  # five chunks
    ([17, 1, 16, 8], [False, True, True, False], [3, 5, PAD, 1]),  # partial chunks, exact multiples, padding
]

# Falcon-H1 Mamba shapes (H, P, G, N, chunk).
GPU_SHAPES = {"h1-0.5b": (24, 64, 1, 128, 128), "h1-7b": (24, 128, 1, 256, 256), "h1-34b": (32, 128, 2, 256, 128)}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _check(lengths, init, slots, H, P, G, N, chunk, dtype, state_dtype=torch.float32, dt_limit=NO_LIMIT,
           launch=None):
    T = sum(lengths)
    num_slots = max(slots) + 2
    # x, B and C as slices of one wider row, like the model's split of the conv output.
    xBC = torch.randn(T, H * P + 2 * G * N, device=DEVICE, dtype=dtype)
    x = xBC[:, : H * P].view(T, H, P)
    B = xBC[:, H * P: H * P + G * N].view(T, G, N)
    C = xBC[:, H * P + G * N:].view(T, G, N)
    dt = torch.randn(T, H, device=DEVICE, dtype=dtype)
    A = -torch.rand(H, device=DEVICE) * 2 - 0.1
    D = torch.randn(H, device=DEVICE)
    dt_bias = torch.randn(H, device=DEVICE) - 2
    states = torch.randn(num_slots, H, P, N, device=DEVICE).to(state_dtype)
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    slots_t = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    init_t = torch.tensor(init, dtype=torch.bool, device=DEVICE)
    ref_states, out_states = states.clone(), states.clone()
    args = (x, dt, A, B, C, D, dt_bias, dt_limit)
    ref = ssd_scan.ssd_scan_varlen_ref(*args, ref_states, qsl, slots_t, init_t, chunk)
    out = ssd_scan.ssd_scan_varlen(*args, out_states, qsl, slots_t, init_t, chunk, launch=launch)
    live = torch.cat([torch.full((n,), s >= 0, dtype=torch.bool) for n, s in zip(lengths, slots)]).to(DEVICE)
    tol = 1e-3 if dtype == torch.float32 and state_dtype == torch.float32 else 1e-2
    assert _rel_err(out[live], ref[live]) < tol
    assert _rel_err(out_states, ref_states) < tol
    unowned = [r for r in range(num_slots) if r not in slots]
    assert torch.equal(out_states[unowned], states[unowned])  # slots nobody owns (padding has none)


@pytest.mark.parametrize("lengths,init,slots", LAYOUTS)
def test_scan_interpreted(lengths, init, slots):
    _check(lengths, init, slots, H=4, P=16, G=2, N=16, chunk=8, dtype=torch.float32)


def test_scan_chunk16_one_group_dt_limit_interpreted():
    _check([33, 2, 16], [True, False, True], [1, 0, 2], H=2, P=16, G=1, N=16, chunk=16, dtype=torch.float32,
           dt_limit=(0.05, 0.8))


def test_scan_empty_sequence_interpreted():
    # A sequence of no tokens keeps its initial state (or gets zeros without one); the walk reads no decay for it.
    _check([0, 5, 9, 0], [True, True, False, False], [0, 1, 2, 3], H=2, P=16, G=1, N=16, chunk=8,
           dtype=torch.float32)


def test_scan_head_dim_under_a_tile_interpreted():
    # tests/tiny_models.py's Falcon-H1: H 8, P 8 (below the 16-wide dot tiles), G 2, N 16, chunk 8.
    _check([11, 1, 24], [False, True, True], [2, 0, 3], H=8, P=8, G=2, N=16, chunk=8, dtype=torch.float32)


def test_scan_bf16_state_interpreted():
    # bf16 x/B/C run on the GPU only: Triton's interpreter multiplies bf16 dot operands as their raw bits.
    _check([20, 5], [True, False], [0, 1], H=2, P=16, G=1, N=16, chunk=8, dtype=torch.float32,
           state_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_scan_gpu(model, dtype):
    H, P, G, N, chunk = GPU_SHAPES[model]
    _check([700, 1, 2 * chunk, 77, 5], [True, False, True, True, False], [6, 2, 0, PAD, 4],
           H=H, P=P, G=G, N=N, chunk=chunk, dtype=dtype)


@pytest.mark.gpu
def test_scan_cuda_graph():
    """The prefill wrapper builds its chunk metadata on the device: it captures and replays with new
    sequence lengths (same total) and slots."""
    H, P, G, N, chunk = GPU_SHAPES["h1-34b"]
    T = 300
    x = torch.randn(T, H, P, device=DEVICE, dtype=torch.bfloat16)
    dt = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    B, C = (torch.randn(T, G, N, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    A = -torch.rand(H, device=DEVICE) * 2 - 0.1
    D, dt_bias = torch.randn(H, device=DEVICE), torch.randn(H, device=DEVICE) - 2
    states = torch.randn(6, H, P, N, device=DEVICE)
    qsl = torch.tensor([0, 100, 200, 300], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    init = torch.tensor([True, False, True], device=DEVICE)
    args = (x, dt, A, B, C, D, dt_bias, NO_LIMIT)
    ssd_scan.ssd_scan_varlen(*args, states.clone(), qsl, slots, init, chunk)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ssd_scan.ssd_scan_varlen(*args, states, qsl, slots, init, chunk)
    qsl.copy_(torch.tensor([0, 1, 260, 300], dtype=torch.int32))
    slots.copy_(torch.tensor([4, PAD, 1], dtype=torch.int32))
    init.copy_(torch.tensor([False, True, True]))
    ref_states = states.clone()
    graph.replay()
    ref = ssd_scan.ssd_scan_varlen_ref(*args, ref_states, qsl, slots, init, chunk)
    live = torch.ones(T, dtype=torch.bool, device=DEVICE)
    live[1:260] = False
    assert _rel_err(out[live], ref[live]) < 1e-2
    assert _rel_err(states, ref_states) < 1e-2


def test_scan_several_token_blocks_per_chunk_interpreted():
    # The GPU tiles split a chunk into several token blocks (chunk 256, 128-token blocks); here chunk 32 in
    # 16-token blocks: the state walk crosses blocks inside a chunk and the scan reads CB in 16-row tiles.
    # Chunks find their sequence reading query_start_loc a block of sequences at a time: 2 here, 32 there.
    small = ssd_scan.SsdLaunch(state_k=16, cb_m=16, seq_block=2, scan_m=16, scan_p=16, scan_k=16, scan_n=16)
    _check([70, 33, 5, 32], [True, False, True, True], [1, 3, 0, 2], H=2, P=16, G=1, N=16, chunk=32,
           dtype=torch.float32, launch=small)


def test_scan_ignores_unwritten_scratch_interpreted(monkeypatch):
    # The chunk scan reads whole CB rows, entries above the diagonal included, which the CB kernel leaves
    # unwritten when the scan's row tiles are taller than CB's (32 vs 16 here): scratch filled with NaN must
    # not reach the output.
    empty = torch.empty

    def nan_empty(*shape, dtype=None, **kw):
        t = empty(*shape, dtype=dtype, **kw)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(ssd_scan.torch, "empty", nan_empty)
    tall = ssd_scan.SsdLaunch(state_k=16, cb_m=16, scan_m=32, scan_p=16, scan_k=16, scan_n=16)
    _check([70, 5, 32], [True, False, True], [1, 0, 2], H=2, P=16, G=1, N=16, chunk=32, dtype=torch.float32,
           launch=tall)


def test_launch_per_shape():
    base = ssd_scan.SsdLaunch()
    for (P, N, chunk, long), fields in ssd_scan.TUNED.items():  # the table's entry, by sequence length
        T = 4096 if long else 16 * 256
        assert ssd_scan.ssd_launch(torch.bfloat16, P, N, chunk, T, 1 if long else 16) == replace(base, **fields)
    assert ssd_scan.ssd_launch(torch.bfloat16, 8, 16, 8, 100, 3) == base  # a shape not in the table
    # fp32: one launch for every batch, so a sequence's rounding does not depend on its neighbours.
    assert len({ssd_scan.ssd_launch(torch.float32, 128, 256, 256, T, s) for T, s in [(4096, 1), (4096, 16)]}) == 1


def test_candidates_fit_the_shape():
    # Falcon-H1-0.5B's shape: P 64 clips the 128- and 256-wide P tiles, so candidates merge; the merged go.
    base = ssd_scan.SsdLaunch()
    scans = ssd_scan.launch_candidates(base, ssd_scan.SCAN_CANDIDATES, P=64, N=128, chunk=128)
    assert scans[0] == ssd_scan.launch_candidates(base, [{}], P=64, N=128, chunk=128)[0]  # the defaults, first
    assert len(set(scans)) == len(scans) < len(ssd_scan.SCAN_CANDIDATES)
    assert all(c.scan_p <= 64 and c.scan_n <= 128 and c.scan_m <= 128 for c in scans)
    walks = ssd_scan.launch_candidates(base, ssd_scan.WALK_CANDIDATES, P=8, N=16, chunk=8)
    assert {(c.state_p, c.state_n, c.state_k) for c in walks} == {(16, 16, 16)}


def _launch_id(c: ssd_scan.SsdLaunch) -> str:
    return (f"scan{c.scan_m}-{c.scan_p}-{c.scan_k}-{c.scan_n}-{c.scan_warps}-{c.scan_stages}"
            f"_walk{c.state_p}-{c.state_n}-{c.state_k}-{c.state_warps}-{c.state_stages}")


# Every candidate the sweep may pick (scan and walk), at a shape as wide as the widest tiles but 256: P 128,
# N 128, chunk 128 (256-wide P tiles and 256-token walk steps run clipped to 128, merged with their twins).
WIDE_CANDIDATES = ssd_scan.launch_candidates(ssd_scan.SsdLaunch(), ssd_scan.SCAN_CANDIDATES + ssd_scan.WALK_CANDIDATES,
                                             P=128, N=128, chunk=128)


@pytest.mark.parametrize("launch", WIDE_CANDIDATES, ids=_launch_id)
def test_scan_every_candidate_interpreted(launch):
    _check([140, 9], [True, False], [0, 1], H=1, P=128, G=1, N=128, chunk=128, dtype=torch.float32, launch=launch)
