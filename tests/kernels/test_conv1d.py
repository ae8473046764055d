"""Causal conv1d Triton kernels against their torch references: interpreted on CPU at small shapes
(TRITON_INTERPRET=1), compiled on a GPU at the published Falcon-H1 / FalconMamba shapes."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import conv1d  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAD = -1

# (sequence lengths, has_initial_state, state slots); slot -1 is a padded sequence.
LAYOUTS = [
    ([1], [True], [3]),
    ([1, 1, 1], [True, False, True], [5, 0, 2]),
    ([2, 1, 3], [True, True, False], [1, 6, 4]),  # all shorter than K-1 = 3
    ([20, 1, 7, 2], [False, True, True, True], [7, 2, PAD, 0]),
    ([40, 5, 3, 17], [True, False, True, False], [0, 3, 1, 6]),
]

# Published shapes: conv_dim = d_ssm + 2*G*N (Falcon-H1) or d_inner (FalconMamba), K = 4.
GPU_CHANNELS = {"h1-0.5b": 1536 + 2 * 128, "h1-7b": 3072 + 2 * 256, "h1-34b": 4096 + 2 * 2 * 256, "mamba-7b": 8192}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 1e-2


# The engine's x: a column slice of in_proj's output, (first column, row width) of [z | xBC | dt | q | k | v] for
# Falcon-H1-7B, of [x | z] for FalconMamba-7B.
MODEL_SLICES = {"h1-7b": (3072, 8728), "mamba-7b": (0, 16384)}


def _inputs(lengths: list[int], C: int, K: int, num_slots: int, dtype: torch.dtype, row_pad: int = 0,
            row_width: int | None = None):
    """Random x (columns row_pad .. row_pad+C-1 of a [T, row_width] tensor, like the model's split of in_proj),
    weights, bias, states."""
    T = sum(lengths)
    x = torch.randn(T, row_width or C + row_pad, device=DEVICE, dtype=dtype)[:, row_pad: row_pad + C]
    weight = torch.randn(C, K, device=DEVICE, dtype=dtype) / K
    bias = torch.randn(C, device=DEVICE, dtype=dtype)
    states = torch.randn(num_slots, C, K - 1, device=DEVICE, dtype=dtype)
    return x, weight, bias, states


def _check_varlen(lengths, init, slots, C, K, dtype, with_bias=True, run_len=None, row_pad=5, row_width=None):
    num_slots = max(slots) + 2
    x, weight, bias, states = _inputs(lengths, C, K, num_slots, dtype, row_pad=row_pad, row_width=row_width)
    bias = bias if with_bias else None
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    slots_t = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    init_t = torch.tensor(init, dtype=torch.bool, device=DEVICE)
    ref_states, out_states = states.clone(), states.clone()
    ref = conv1d.causal_conv1d_varlen_ref(x, weight, bias, ref_states, qsl, slots_t, init_t)
    out = conv1d.causal_conv1d_varlen(x, weight, bias, out_states, qsl, slots_t, init_t, run_len=run_len)
    live = torch.cat([torch.full((n,), s >= 0, dtype=torch.bool) for n, s in zip(lengths, slots)]).to(DEVICE)
    assert _rel_err(out[live], ref[live]) < _tol(dtype)
    assert _rel_err(out_states, ref_states) < _tol(dtype)
    unowned = [r for r in range(num_slots) if r not in slots]
    assert torch.equal(out_states[unowned], states[unowned])  # slots nobody owns (padding has none)


def _check_update(batch, C, K, dtype, pad_rows=()):
    num_slots = batch + 3
    x, weight, bias, states = _inputs([batch], C, K, num_slots, dtype, row_pad=3)
    slots = torch.randperm(num_slots, device=DEVICE)[:batch].to(torch.int32)
    for r in pad_rows:
        slots[r] = PAD
    ref_states, out_states = states.clone(), states.clone()
    ref = conv1d.causal_conv1d_update_ref(x, weight, bias, ref_states, slots)
    out = conv1d.causal_conv1d_update(x, weight, bias, out_states, slots)
    assert _rel_err(out, ref) < _tol(dtype)
    assert torch.equal(out[list(pad_rows)], torch.zeros_like(out[list(pad_rows)]))
    assert _rel_err(out_states, ref_states) < _tol(dtype)


@pytest.mark.parametrize("lengths,init,slots", LAYOUTS)
def test_varlen_interpreted(lengths, init, slots):
    _check_varlen(lengths, init, slots, C=40, K=4, dtype=torch.float32)


@pytest.mark.parametrize("K", [2, 3])
def test_varlen_other_widths(K):
    _check_varlen([5, 1, 2], [True, True, False], [2, 0, 1], C=24, K=K, dtype=torch.float32, with_bias=False)


# Sequences of 1..14 tokens (several shorter than K-1 = 3), initial states mixed, one padded.
RUN_LAYOUT = ([3, 9, 1, 3, 14, 5, 1, 8, 2], [True, False, True, True, True, True, False, True, True],
              [4, 0, PAD, 7, 2, 1, 5, 3, 6])


@pytest.mark.parametrize("run_len", [8, 16, 24, 48])
def test_varlen_runs_cross_sequences(run_len):
    """Runs of run_len tokens start inside sequences, in their first K-1 tokens (32), or on their first token (16)."""
    _check_varlen(*RUN_LAYOUT, C=40, K=4, dtype=torch.float32, run_len=run_len)


def test_varlen_one_sequence_many_runs():
    _check_varlen([70], [True], [1], C=24, K=4, dtype=torch.float32, run_len=8)


@pytest.mark.parametrize("C,row_pad,row_width,row_align", [(40, 5, None, 1), (48, 8, 64, 8)])
def test_varlen_bf16_interpreted(C, row_pad, row_width, row_align):
    """bf16 on an unaligned column slice and on a 16-byte aligned one (the ROW_ALIGN > 1 path)."""
    x = torch.empty(4, row_width or C + row_pad, device=DEVICE, dtype=torch.bfloat16)[:, row_pad: row_pad + C]
    assert conv1d._row_align(x, torch.empty(4, C, device=DEVICE, dtype=torch.bfloat16)) == row_align
    _check_varlen(*RUN_LAYOUT, C=C, K=4, dtype=torch.bfloat16, run_len=8, row_pad=row_pad, row_width=row_width)


def test_row_align():
    """Vector row access only where every row of x and out starts 16-byte aligned with unit channel stride."""
    def slice_of(first: int, width: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(8, width, dtype=dtype)[:, first: first + 3584]

    out = torch.empty(8, 3584, dtype=torch.bfloat16)
    assert conv1d._row_align(slice_of(*MODEL_SLICES["h1-7b"]), out) == 8  # row stride 8728: 16 B but not 16 elements
    assert conv1d._row_align(slice_of(0, 16384), out) == 8
    assert conv1d._row_align(slice_of(5, 8728), out) == 1  # rows start 10 bytes past a 16-byte boundary
    assert conv1d._row_align(slice_of(0, 3588), out) == 1  # row stride 7176 bytes
    assert conv1d._row_align(slice_of(0, 3588, torch.float32), out.float()) == 4
    assert conv1d._row_align(out.t().contiguous().t(), out) == 1  # channel stride > 1


@pytest.mark.parametrize("batch,pad_rows", [(1, ()), (5, (1, 4))])
def test_update_interpreted(batch, pad_rows):
    _check_update(batch, C=72, K=4, dtype=torch.float32, pad_rows=pad_rows)


def test_update_bf16_interpreted():
    _check_update(3, C=40, K=4, dtype=torch.bfloat16, pad_rows=(0,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model", list(GPU_CHANNELS))
def test_varlen_gpu(model, dtype):
    _check_varlen([1000, 1, 2, 300, 37], [True, False, True, True, False], [9, 3, 0, PAD, 5],
                  C=GPU_CHANNELS[model], K=4, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[4096], [256] * 16, [1000, 1, 2, 300, 37]])
@pytest.mark.parametrize("model", list(MODEL_SLICES))
def test_varlen_gpu_model_strides(model, lengths):
    """x exactly as the engine passes it (the 16-byte vector path), default runs and runs that split sequences."""
    first, width = MODEL_SLICES[model]
    init = [b % 3 != 1 for b in range(len(lengths))]
    slots = [PAD if b == 3 else b for b in range(len(lengths))]
    x = torch.empty(8, width, device=DEVICE, dtype=torch.bfloat16)[:, first: first + GPU_CHANNELS[model]]
    assert conv1d._row_align(x, torch.empty_like(x, memory_format=torch.contiguous_format)) == 8
    for run_len in (None, 40):
        _check_varlen(lengths, init, slots, C=GPU_CHANNELS[model], K=4, dtype=torch.bfloat16, run_len=run_len,
                      row_pad=first, row_width=width)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model", list(GPU_CHANNELS))
def test_update_gpu(model, dtype):
    _check_update(64, C=GPU_CHANNELS[model], K=4, dtype=dtype, pad_rows=(3, 63))


@pytest.mark.gpu
def test_update_cuda_graph():
    """Captured once, replayed with new tokens and a new slot order (padding included): no host syncs."""
    batch, C, K = 8, GPU_CHANNELS["h1-7b"], 4
    x, weight, bias, states = _inputs([batch], C, K, batch + 4, torch.bfloat16)
    slots = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    conv1d.causal_conv1d_update(x, weight, bias, states.clone(), slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = conv1d.causal_conv1d_update(x, weight, bias, states, slots)
    x.copy_(torch.randn_like(x))
    slots.copy_(torch.randperm(batch + 4, device=DEVICE)[:batch].to(torch.int32))
    slots[2] = PAD
    ref_states = states.clone()
    graph.replay()
    ref = conv1d.causal_conv1d_update_ref(x, weight, bias, ref_states, slots)
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(states, ref_states) < 1e-2
