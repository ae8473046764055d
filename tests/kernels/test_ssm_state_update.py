"""Mamba2 decode state update (Triton) against its torch reference: interpreted on CPU at small shapes
(TRITON_INTERPRET=1), compiled on a GPU at the published Falcon-H1 shapes."""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import ssm_state_update as ssu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAD = -1
NO_LIMIT = (0.0, math.inf)

# Falcon-H1 Mamba shapes (H, P, G, N).
GPU_SHAPES = {"h1-0.5b": (24, 64, 1, 128), "h1-7b": (24, 128, 1, 256), "h1-34b": (32, 128, 2, 256)}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _check(batch, H, P, G, N, dtype, state_dtype, dt_limit=NO_LIMIT, pad_rows=()):
    num_slots = batch + 3
    x = torch.randn(batch, H, P + 2, device=DEVICE, dtype=dtype)[:, :, 2:]  # strided, like the model's split
    dt = torch.randn(batch, H, device=DEVICE, dtype=dtype)
    A = -torch.rand(H, device=DEVICE) * 4 - 0.1
    B = torch.randn(batch, G, N, device=DEVICE, dtype=dtype)
    C = torch.randn(batch, G, N, device=DEVICE, dtype=dtype)
    D = torch.randn(H, device=DEVICE)
    dt_bias = torch.randn(H, device=DEVICE) - 1
    states = torch.randn(num_slots, H, P, N, device=DEVICE).to(state_dtype)
    slots = torch.randperm(num_slots, device=DEVICE)[:batch].to(torch.int32)
    for r in pad_rows:
        slots[r] = PAD
    ref_states, out_states = states.clone(), states.clone()
    ref = ssu.ssm_state_update_ref(x, dt, A, B, C, D, dt_bias, dt_limit, ref_states, slots)
    out = ssu.ssm_state_update(x, dt, A, B, C, D, dt_bias, dt_limit, out_states, slots)
    tol = 1e-3 if dtype == torch.float32 and state_dtype == torch.float32 else 1e-2
    assert _rel_err(out, ref) < tol
    assert torch.equal(out[list(pad_rows)], torch.zeros_like(out[list(pad_rows)]))
    assert _rel_err(out_states, ref_states) < tol
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[slots >= 0].long().cpu()] = False
    assert torch.equal(out_states[untouched.to(DEVICE)], states[untouched.to(DEVICE)])


@pytest.mark.parametrize("batch,G,pad_rows", [(1, 1, ()), (4, 2, (0, 2))])
def test_update_interpreted(batch, G, pad_rows):
    _check(batch, H=4, P=16, G=G, N=16, dtype=torch.float32, state_dtype=torch.float32, pad_rows=pad_rows)


def test_update_tiny_model_shapes_interpreted():
    _check(2, H=8, P=8, G=2, N=16, dtype=torch.float32, state_dtype=torch.float32)


def test_update_dt_limit_bf16_state_interpreted():
    _check(3, H=4, P=8, G=1, N=16, dtype=torch.bfloat16, state_dtype=torch.bfloat16, dt_limit=(0.05, 0.5),
           pad_rows=(1,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_update_gpu(model, batch, dtype, state_dtype):
    _check(batch, *GPU_SHAPES[model], dtype=dtype, state_dtype=state_dtype, pad_rows=(batch - 1,) if batch > 1 else ())


@pytest.mark.gpu
def test_update_cuda_graph():
    """Captured once, replayed with new tokens and a new slot order (padding included): no host syncs."""
    batch, (H, P, G, N) = 8, GPU_SHAPES["h1-34b"]
    x = torch.randn(batch, H, P, device=DEVICE, dtype=torch.bfloat16)
    dt = torch.randn(batch, H, device=DEVICE, dtype=torch.bfloat16)
    A = -torch.rand(H, device=DEVICE) * 4 - 0.1
    B, C = (torch.randn(batch, G, N, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    D, dt_bias = torch.randn(H, device=DEVICE), torch.randn(H, device=DEVICE) - 1
    states = torch.randn(batch + 4, H, P, N, device=DEVICE)
    slots = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    ssu.ssm_state_update(x, dt, A, B, C, D, dt_bias, NO_LIMIT, states.clone(), slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ssu.ssm_state_update(x, dt, A, B, C, D, dt_bias, NO_LIMIT, states, slots)
    for t in (x, dt, B, C):
        t.copy_(torch.randn_like(t))
    slots.copy_(torch.randperm(batch + 4, device=DEVICE)[:batch].to(torch.int32))
    slots[5] = PAD
    ref_states = states.clone()
    graph.replay()
    ref = ssu.ssm_state_update_ref(x, dt, A, B, C, D, dt_bias, NO_LIMIT, ref_states, slots)
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(states, ref_states) < 1e-3
