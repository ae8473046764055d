"""The fused Mamba2 decode step (conv update + state update + gated norm, kernels/mamba2_decode.py) against its
torch reference (the three references in sequence): interpreted on CPU at small shapes (TRITON_INTERPRET=1),
compiled on a GPU at the published Falcon-H1 shapes, and replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from kernels import mamba2_decode as m2d
from tests.kernels.test_ssm_state_update import DEVICE, GPU_SHAPES, NO_LIMIT, PAD, _rel_err


def _inputs(batch, H, P, G, N, dtype, state_dtype, K=4, bias=True, pad_rows=()):
    d_ssm, GN = H * P, G * N
    conv_dim = d_ssm + 2 * GN
    # z | xBC | dt as column slices of one in_proj row, as the mixer splits it.
    zxbcdt = torch.randn(batch, d_ssm + conv_dim + H, device=DEVICE, dtype=dtype)
    z, xBC, dt = zxbcdt.split([d_ssm, conv_dim, H], dim=-1)
    num_slots = batch + 3
    slots = torch.randperm(num_slots, device=DEVICE)[:batch].to(torch.int32)
    for r in pad_rows:
        slots[r] = PAD
    return dict(
        z=z, xBC=xBC, dt=dt, conv_weight=torch.randn(conv_dim, K, device=DEVICE, dtype=dtype) * 0.5,
        conv_bias=torch.randn(conv_dim, device=DEVICE, dtype=dtype) if bias else None,
        A=-torch.rand(H, device=DEVICE) * 4 - 0.1, D=torch.randn(H, device=DEVICE),
        dt_bias=torch.randn(H, device=DEVICE) - 1, dt_limit=NO_LIMIT,
        norm_weight=torch.rand(d_ssm, device=DEVICE, dtype=dtype) + 0.5, eps=1e-5, n_groups=G,
        norm_before_gate=False, conv_states=torch.randn(num_slots, conv_dim, K - 1, device=DEVICE, dtype=dtype),
        ssm_states=torch.randn(num_slots, H, P, N, device=DEVICE).to(state_dtype), state_slots=slots)


def _check(args: dict, tol: float, **kernel_args) -> None:
    ref_args = dict(args, conv_states=args["conv_states"].clone(), ssm_states=args["ssm_states"].clone())
    out_args = dict(args, conv_states=args["conv_states"].clone(), ssm_states=args["ssm_states"].clone())
    ref = m2d.mamba2_decode_step_ref(**ref_args)
    out = m2d.mamba2_decode_step(**out_args, **kernel_args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert _rel_err(out, ref) < tol
    assert _rel_err(out_args["ssm_states"], ref_args["ssm_states"]) < tol
    assert torch.equal(out_args["conv_states"], ref_args["conv_states"])  # a shift: exact
    pad = args["state_slots"] < 0
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    untouched = torch.ones(args["conv_states"].shape[0], dtype=torch.bool, device=DEVICE)
    untouched[args["state_slots"][~pad].long()] = False
    assert torch.equal(out_args["ssm_states"][untouched], args["ssm_states"][untouched])
    assert torch.equal(out_args["conv_states"][untouched], args["conv_states"][untouched])


@pytest.mark.parametrize("batch,G,pad_rows", [(1, 1, ()), (4, 2, (0, 2))])
def test_decode_step_interpreted(batch, G, pad_rows):
    _check(_inputs(batch, H=4, P=8, G=G, N=16, dtype=torch.float32, state_dtype=torch.float32, pad_rows=pad_rows),
           1e-3)


def test_decode_step_tiny_model_shapes_interpreted():
    """tests/tiny_models.py's Falcon-H1 mixer (8 heads of 8, 2 groups), no conv bias, norm before the gate,
    a dt limit, several state rows a program."""
    args = _inputs(2, H=8, P=8, G=2, N=16, dtype=torch.float32, state_dtype=torch.float32, bias=False)
    _check(dict(args, norm_before_gate=True, dt_limit=(0.05, 0.5)), 1e-3, block_p=4)


def test_decode_step_other_conv_width_fp16_interpreted():
    _check(_inputs(3, H=2, P=16, G=1, N=8, dtype=torch.float16, state_dtype=torch.float32, K=3, pad_rows=(1,)),
           1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_decode_step_gpu(model, batch, dtype, state_dtype):
    args = _inputs(batch, *GPU_SHAPES[model], dtype=dtype, state_dtype=state_dtype,
                   pad_rows=(batch - 1,) if batch > 1 else ())
    _check(args, 1e-3 if dtype == state_dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_decode_step_cuda_graph():
    """Captured once, replayed with new tokens and a new slot order (padding included): no host syncs."""
    args = _inputs(8, *GPU_SHAPES["h1-34b"], dtype=torch.bfloat16, state_dtype=torch.float32)
    m2d.mamba2_decode_step(**dict(args, conv_states=args["conv_states"].clone(),
                                  ssm_states=args["ssm_states"].clone()))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m2d.mamba2_decode_step(**args)
    for name in ("z", "xBC", "dt"):
        args[name].copy_(torch.randn_like(args[name]))
    args["state_slots"].copy_(torch.randperm(11, device=DEVICE)[:8].to(torch.int32))
    args["state_slots"][5] = PAD
    ref_args = dict(args, conv_states=args["conv_states"].clone(), ssm_states=args["ssm_states"].clone())
    graph.replay()
    ref = m2d.mamba2_decode_step_ref(**ref_args)
    assert _rel_err(out, ref) < 2e-2
    assert _rel_err(args["ssm_states"], ref_args["ssm_states"]) < 1e-3
    assert torch.equal(args["conv_states"], ref_args["conv_states"])
