"""Mamba1 selective scan (varlen prefill) and step (decode), Triton against the torch references:
interpreted on CPU at small shapes (TRITON_INTERPRET=1), compiled on a GPU at FalconMamba-7B's shapes."""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import selective_scan as ss  # noqa: E402
from kernels.norm import split_rms_norm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAD = -1

# (sequence lengths, has_initial_state, state slots); slot -1 is a padded sequence. The kernel's time tile is 16.
LAYOUTS = [
    ([1], [True], [2]),
    ([1, 3, 1], [False, True, True], [4, 0, 2]),
    ([16, 5], [True, False], [1, 3]),
    ([37, 2, 9], [True, True, False], [3, PAD, 0]),
]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _params(CH: int, N: int):
    A = -torch.rand(CH, N, device=DEVICE) * 2 - 0.05
    D = torch.randn(CH, device=DEVICE)
    dt_bias = torch.randn(CH, device=DEVICE) - 2
    return A, D, dt_bias


def _tokens(T: int, CH: int, N: int, dtype: torch.dtype):
    """x and z as column slices of one wider row (like the model's split of in_proj); dt, B, C."""
    xz = torch.randn(T, 2 * CH, device=DEVICE, dtype=dtype)
    x, z = xz[:, :CH], xz[:, CH:]
    dt = torch.randn(T, CH, device=DEVICE, dtype=dtype)
    B = torch.randn(T, N, device=DEVICE, dtype=dtype)
    C = torch.randn(T, N, device=DEVICE, dtype=dtype)
    return x, dt, B, C, z


def _check_varlen(lengths, init, slots, CH, N, dtype, state_dtype=torch.float32):
    num_slots = max(slots) + 2
    x, dt, B, C, z = _tokens(sum(lengths), CH, N, dtype)
    A, D, dt_bias = _params(CH, N)
    states = torch.randn(num_slots, CH, N, device=DEVICE).to(state_dtype)
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    slots_t = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    init_t = torch.tensor(init, dtype=torch.bool, device=DEVICE)
    ref_states, out_states = states.clone(), states.clone()
    ref = ss.selective_scan_varlen_ref(x, dt, A, B, C, D, dt_bias, z, ref_states, qsl, slots_t, init_t)
    out = ss.selective_scan_varlen(x, dt, A, B, C, D, dt_bias, z, out_states, qsl, slots_t, init_t)
    live = torch.cat([torch.full((n,), s >= 0, dtype=torch.bool) for n, s in zip(lengths, slots)]).to(DEVICE)
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert _rel_err(out[live], ref[live]) < tol
    assert _rel_err(out_states, ref_states) < tol
    unowned = [r for r in range(num_slots) if r not in slots]
    assert torch.equal(out_states[unowned], states[unowned])  # slots nobody owns (padding has none)


def _check_update(batch, CH, N, dtype, state_dtype=torch.float32, pad_rows=()):
    num_slots = batch + 3
    x, dt, B, C, z = _tokens(batch, CH, N, dtype)
    A, D, dt_bias = _params(CH, N)
    states = torch.randn(num_slots, CH, N, device=DEVICE).to(state_dtype)
    slots = torch.randperm(num_slots, device=DEVICE)[:batch].to(torch.int32)
    for r in pad_rows:
        slots[r] = PAD
    ref_states, out_states = states.clone(), states.clone()
    ref = ss.selective_scan_update_ref(x, dt, A, B, C, D, dt_bias, z, ref_states, slots)
    out = ss.selective_scan_update(x, dt, A, B, C, D, dt_bias, z, out_states, slots)
    tol = 1e-3 if dtype == torch.float32 and state_dtype == torch.float32 else 1e-2
    assert _rel_err(out, ref) < tol
    assert torch.equal(out[list(pad_rows)], torch.zeros_like(out[list(pad_rows)]))
    assert _rel_err(out_states, ref_states) < tol
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[slots >= 0].long().cpu()] = False
    assert torch.equal(out_states[untouched.to(DEVICE)], states[untouched.to(DEVICE)])


# The same with the token axis cut into chunks of 16 (the prefill kernel's chunked passes): sequences within
# one chunk, across one or several boundaries, ending or starting on one, length 1 on either side of one,
# empty ones (inside a chunk, on a boundary, at the end), padded ones crossing boundaries.
CHUNKED_LAYOUTS = [
    ([40], [True], [1]),
    ([5, 30, 1, 16, 9], [False, True, True, False, True], [0, 3, PAD, 2, 4]),
    ([16, 16, 17], [True, False, True], [1, 0, 2]),
    ([15, 1, 1, 15, 2], [True, False, True, True, False], [4, 2, 0, 1, 3]),
    ([10, 0, 23, 0], [True, False, True, False], [0, 1, 2, 3]),
    ([16, 0, 20], [False, False, True], [2, 0, 1]),
    ([10, 30, 12], [True, True, False], [0, PAD, 1]),
]


@pytest.mark.parametrize("lengths,init,slots", LAYOUTS)
def test_varlen_interpreted(lengths, init, slots):
    _check_varlen(lengths, init, slots, CH=24, N=16, dtype=torch.float32)


@pytest.fixture
def chunk16(monkeypatch):
    """Chunks of 16 tokens whatever the size (normally L keeps chunks x channels near blocking.chains)."""
    monkeypatch.setattr(ss, "PREFILL_BLOCKING", dataclasses.replace(ss.PREFILL_BLOCKING, min_chunk=16, chains=1 << 30))


@pytest.mark.parametrize("lengths,init,slots", CHUNKED_LAYOUTS)
def test_varlen_chunked_interpreted(chunk16, lengths, init, slots):
    _check_varlen(lengths, init, slots, CH=24, N=16, dtype=torch.float32)


# Tiles of 1, 4 and 8 tokens (the default 8 runs above) against chunks of 16: lengths of no multiple of the tile
# within and across chunks, remainders on either side of a boundary, empty and padded sequences.
TILE_LAYOUT = ([3, 21, 0, 7, 35, 1], [True, False, True, True, False, True], [2, 0, 5, PAD, 1, 3])


@pytest.mark.parametrize("tile", [1, 4])
def test_varlen_tiles_interpreted(chunk16, monkeypatch, tile):
    monkeypatch.setattr(ss, "PREFILL_BLOCKING", dataclasses.replace(ss.PREFILL_BLOCKING, tile=tile))
    _check_varlen(*TILE_LAYOUT, CH=24, N=16, dtype=torch.float32)


def test_varlen_tile_past_last_token_interpreted(chunk16):
    """The last sequence is 1 token, the token axis ending 1 token into its tile (B/C reads past T land in the
    zero padding); bf16 inputs."""
    _check_varlen([9, 16, 8, 1], [False, True, True, True], [1, 2, 0, 3], CH=40, N=16, dtype=torch.bfloat16)


def test_varlen_chunked_bf16_channel_blocks_interpreted(chunk16):
    """bf16 inputs, N below its block, channels over two blocks (the second one partly masked)."""
    _check_varlen([7, 26, 3], [True, False, True], [2, 0, 1], CH=160, N=12, dtype=torch.bfloat16)


def test_varlen_chunked_full_blocks_interpreted(chunk16):
    """Channel blocks that tile the channels exactly (the unmasked loads the model shapes take)."""
    block = ss.PREFILL_BLOCKING.block_c
    _check_varlen([21, 12], [True, False], [1, 0], CH=block, N=16, dtype=torch.float32)


def test_varlen_bf16_interpreted():
    _check_varlen([20, 3], [True, False], [0, 1], CH=16, N=8, dtype=torch.bfloat16)


@pytest.mark.parametrize("batch,pad_rows", [(1, ()), (5, (1, 4))])
def test_update_interpreted(batch, pad_rows):
    _check_update(batch, CH=40, N=16, dtype=torch.float32, pad_rows=pad_rows)


def test_update_bf16_state_interpreted():
    _check_update(3, CH=16, N=16, dtype=torch.bfloat16, state_dtype=torch.bfloat16, pad_rows=(2,))


# FalconMamba-7B: d_inner 8192, N 16.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_gpu(dtype):
    _check_varlen([600, 1, 3, 257, 40], [True, False, True, True, False], [5, 1, PAD, 0, 7],
                  CH=8192, N=16, dtype=dtype)


@pytest.mark.gpu
def test_varlen_long_gpu():
    """One 4,096-token sequence (the token axis in several chunks) after a short one, from a saved state."""
    _check_varlen([5, 4096], [False, True], [1, 0], CH=8192, N=16, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[4096], [256] * 16], ids=["4096x1", "16x256"])
def test_varlen_falcon_mamba_prefill_gpu(lengths):
    """The two prefill shapes the blockings are tuned at, half the sequences from saved states."""
    init = [i % 2 == 1 for i in range(len(lengths))]
    _check_varlen(lengths, init, list(range(len(lengths))), CH=8192, N=16, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_varlen_cuda_graph():
    """Captured once, replayed with new tokens, a new split of the same token count into sequences, new slots
    and initial-state flags: the chunking depends on the token count alone, and there are no host syncs."""
    CH, N, T = 8192, 16, 900
    x, dt, B, C, z = _tokens(T, CH, N, torch.bfloat16)
    A, D, dt_bias = _params(CH, N)
    states = torch.randn(6, CH, N, device=DEVICE)
    qsl = torch.tensor([0, 600, T], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    init = torch.tensor([True, False], device=DEVICE)
    args = (x, dt, A, B, C, D, dt_bias, z)
    ss.selective_scan_varlen(*args, states.clone(), qsl, slots, init)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ss.selective_scan_varlen(*args, states, qsl, slots, init)
    for t in (x, dt, B, C, z):
        t.copy_(torch.randn_like(t))
    qsl.copy_(torch.tensor([0, 77, T], dtype=torch.int32))
    slots.copy_(torch.tensor([4, 2], dtype=torch.int32))
    init.copy_(torch.tensor([False, True]))
    ref_states = states.clone()
    graph.replay()
    ref = ss.selective_scan_varlen_ref(*args, ref_states, qsl, slots, init)
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(states, ref_states) < 1e-2


def _compiled_variants(kernel) -> int:
    """How many specializations of a Triton kernel this process compiled for the current GPU."""
    device = torch.cuda.current_device()
    if hasattr(kernel, "device_caches"):  # triton >= 3.2
        return len(kernel.device_caches[device][0])
    return len(kernel.cache[device])


@pytest.mark.gpu
def test_varlen_batch_shapes_compile_no_new_variants():
    """A variant of the prefill kernels compiles for ~27 s: once compiled for the model, no batch's token or
    sequence count (1, a multiple of 16, a power of two or not) may compile another one."""
    kernels = (ss._scan_chunk_state_kernel, ss._scan_chunk_output_kernel)
    batches = [[5, 4096], [1], [16], [256] * 16, [7, 300, 1], [3] * 37, [64] * 64]
    _check_varlen(batches[0], [False, True], [1, 0], CH=8192, N=16, dtype=torch.bfloat16)
    compiled = [_compiled_variants(k) for k in kernels]
    for lengths in batches[1:]:
        _check_varlen(lengths, [i % 2 == 0 for i in range(len(lengths))], list(range(len(lengths))),
                      CH=8192, N=16, dtype=torch.bfloat16)
    assert [_compiled_variants(k) for k in kernels] == compiled


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("batch", [1, 33])
def test_update_gpu(batch, dtype, state_dtype):
    pad_rows = (batch - 1,) if batch > 1 else ()
    _check_update(batch, CH=8192, N=16, dtype=dtype, state_dtype=state_dtype, pad_rows=pad_rows)


@pytest.mark.gpu
def test_update_cuda_graph():
    """Captured once, replayed with new tokens and a new slot order (padding included): no host syncs."""
    batch, CH, N = 8, 8192, 16
    x, dt, B, C, z = _tokens(batch, CH, N, torch.bfloat16)
    A, D, dt_bias = _params(CH, N)
    states = torch.randn(batch + 4, CH, N, device=DEVICE)
    slots = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    ss.selective_scan_update(x, dt, A, B, C, D, dt_bias, z, states.clone(), slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ss.selective_scan_update(x, dt, A, B, C, D, dt_bias, z, states, slots)
    for t in (x, dt, B, C, z):
        t.copy_(torch.randn_like(t))
    slots.copy_(torch.randperm(batch + 4, device=DEVICE)[:batch].to(torch.int32))
    slots[0] = PAD
    ref_states = states.clone()
    graph.replay()
    ref = ss.selective_scan_update_ref(x, dt, A, B, C, D, dt_bias, z, ref_states, slots)
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(states, ref_states) < 1e-3


def _check_bcdt_norm_update(batch, CH, N, R, dtype, pad_rows=()):
    """FalconMamba's decode: the norms of dl / B / C inside the update, from the raw x_proj row, against the
    unfused ops (split_rms_norm, dt = W_dt rms(dl), update) and against its own reference."""
    x, _, _, _, z = _tokens(batch, CH, N, dtype)
    A, D, dt_bias = _params(CH, N)
    dlBC = (torch.randn(batch, R + 2 * N + 3, device=DEVICE) * 3).to(dtype)[:, 3:]  # a column slice, as split
    w_dt = (torch.randn(CH, R, device=DEVICE) / R**0.5).to(dtype)
    eps = 1e-6
    states = torch.randn(batch + 2, CH, N, device=DEVICE)
    slots = torch.randperm(batch + 2, device=DEVICE)[:batch].to(torch.int32)
    for r in pad_rows:
        slots[r] = PAD
    dl, B, C = split_rms_norm_ref(dlBC, [R, N, N], eps).split([R, N, N], dim=-1)
    unfused_states, ref_states, out_states = states.clone(), states.clone(), states.clone()
    unfused = ss.selective_scan_update_ref(x, dl @ w_dt.t(), A, B, C, D, dt_bias, z, unfused_states, slots)
    dt_raw = dlBC[:, :R] @ w_dt.t()
    ref = ss.selective_scan_update_bcdt_norm_ref(x, dt_raw, dlBC, eps, A, D, dt_bias, z, ref_states, slots)
    out = ss.selective_scan_update_bcdt_norm(x, dt_raw, dlBC, eps, A, D, dt_bias, z, out_states, slots)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert _rel_err(ref, unfused) < tol and _rel_err(ref_states, unfused_states) < tol
    assert _rel_err(out, ref) < tol and _rel_err(out_states, ref_states) < tol
    assert torch.equal(out[list(pad_rows)], torch.zeros_like(out[list(pad_rows)]))


@pytest.mark.parametrize("batch,pad_rows", [(1, ()), (4, (0, 3))])
def test_update_bcdt_norm_interpreted(batch, pad_rows):
    _check_bcdt_norm_update(batch, CH=32, N=16, R=6, dtype=torch.float32, pad_rows=pad_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 33])
def test_update_bcdt_norm_gpu(batch, dtype):
    """FalconMamba-7B: d_inner 8192, N 16, dt rank 256."""
    _check_bcdt_norm_update(batch, CH=8192, N=16, R=256, dtype=dtype, pad_rows=(batch - 1,) if batch > 1 else ())
