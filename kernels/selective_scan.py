"""Mamba1 selective scan (prefill, varlen) and its single-step update (decode), per-sequence state slots.

Per channel c and state index n, for each token t of a sequence:
    delta_t = softplus(dt_t + dt_bias)                                   [C]
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t          h: [C, N], fp32
    y_t     = (h_t C_t + D * x_t) * SiLU(z_t)
h_0 is ssm_states[slot] when has_initial_state (always, for the update), else zeros; the final h is
written back. Slots < 0 are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels import pdl
from kernels.norm import rms_norm_ref
from kernels.pdl import wait_for_predecessor
from kernels.triton_math import softplus


def _step(state: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
          C: torch.Tensor, D: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step on fp32 tensors: state [..., C, N], x/delta/z [..., C], B/C [..., N]."""
    state = torch.exp(delta[..., None] * A) * state + (delta * x)[..., None] * B[..., None, :]
    y = ((state * C[..., None, :]).sum(-1) + D * x) * F.silu(z)
    return state, y


def selective_scan_varlen_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                              ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                              has_initial_state: torch.Tensor) -> torch.Tensor:
    """x/dt/z [T, C], A [C, N] fp32, B/C [T, N], D/dt_bias [C] fp32, ssm_states [slots, C, N] -> y [T, C]."""
    y = torch.empty_like(x)
    delta = F.softplus(dt.float() + dt_bias.float())
    starts, slots, init = query_start_loc.tolist(), state_slots.tolist(), has_initial_state.tolist()
    for b, slot in enumerate(slots):
        if slot < 0:
            continue
        state = ssm_states[slot].float() if init[b] else x.new_zeros(ssm_states.shape[1:], dtype=torch.float32)
        for t in range(starts[b], starts[b + 1]):
            state, yt = _step(state, x[t].float(), delta[t], A, B[t].float(), C[t].float(), D, z[t].float())
            y[t] = yt.to(y.dtype)
        ssm_states[slot] = state.to(ssm_states.dtype)
    return y


def selective_scan_update_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                              ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """One token per sequence: x/dt/z [Bt, C], B/C [Bt, N]; padded rows (slot < 0) return zeros."""
    y = torch.zeros_like(x)
    keep = state_slots >= 0
    slots = state_slots[keep].long()
    delta = F.softplus(dt[keep].float() + dt_bias.float())
    state, yk = _step(ssm_states[slots].float(), x[keep].float(), delta, A, B[keep].float(), C[keep].float(),
                      D, z[keep].float())
    ssm_states[slots] = state.to(ssm_states.dtype)
    y[keep] = yk.to(y.dtype)
    return y


@triton.jit
def _softplus_series(v, FAST: tl.constexpr):
    """softplus(v) for the prefill loop: v above 20 as is, else log1p(exp(v)), with log1p(u) by its series
    u - u^2/2 + u^3/3 - u^4/4 where u < 1/32 (relative error < 2e-7) so very negative v keep their accuracy
    without a division. FAST (compiled only; the interpreter has no libdevice): the hardware log2
    (lg2.approx, ~2^-22 absolute error) instead of the ~20-instruction accurate one."""
    u = tl.exp2(v * 1.4426950408889634)
    series = u * (1.0 - u * (0.5 - u * (0.3333333333333333 - u * 0.25)))
    if FAST:
        lg = libdevice.fast_log2f(1.0 + u)
    else:
        lg = tl.log2(1.0 + u)
    return tl.where(v > 20.0, v, tl.where(u < 0.03125, series, lg * 0.6931471805599453))


@triton.jit
def _channel_mask(c, CH: tl.constexpr, BLOCK_C: tl.constexpr):
    """c < CH, as a constant (no masked loads in the token loop) when the channel blocks tile CH."""
    if CH % BLOCK_C == 0:
        return tl.full([BLOCK_C], 1, tl.int1)
    else:
        return c < CH


@triton.jit
def _load_rows(base, stride_n, n2, mask, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_N, BLOCK_C] fp32 tile whose row n is loaded from base + n * stride_n ([BLOCK_C] pointers; rows
    past N are zero). One 1D load a row, so the tile gets the layout of the arithmetic, not of a 2D load."""
    tile = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(N):
        row = tl.load(base + i * stride_n, mask=mask, other=0.0).to(tl.float32)
        tile = tl.where(n2 == i, row[None, :], tile)
    return tile


@triton.jit
def _store_rows(base, stride_n, tile, n2, mask, N: tl.constexpr):
    """Row n of tile to base + n * stride_n, n < N (the inverse of _load_rows)."""
    for i in tl.static_range(N):
        row = tl.sum(tl.where(n2 == i, tile, -0.0), axis=0)  # in-thread: the N states are a thread's registers
        tl.store(base + i * stride_n, row.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_column(p, n2, N: tl.constexpr, BLOCK_N: tl.constexpr):
    """One token's B or C (fp32, contiguous) as a [BLOCK_N, 1] column: N scalar loads at constant offsets from p
    (every thread holds all N)."""
    v = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    for i in tl.static_range(N):
        v = tl.where(n2 == i, tl.load(p + i), v)
    return v


@triton.jit
def _load_tile(p, stride_t, n_ok, c_ok, ti, TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    """[TILE, BLOCK_C] tile, as stored, whose row i is token p + i * stride_t ([BLOCK_C] pointers), zeros for
    rows i >= n_ok. 1D loads a row (the layout of the arithmetic, as _load_rows); kept in the stored dtype so the
    conversion waits for the next tile, not the load."""
    tile = tl.zeros((TILE, BLOCK_C), dtype=p.dtype.element_ty)
    for i in tl.static_range(TILE):
        row = tl.load(p + i * stride_t, mask=tl.where(i < n_ok, c_ok, False), other=0.0)
        tile = tl.where(ti == i, row[None, :], tile)
    return tile


@triton.jit
def _row(tile, ti, i: tl.constexpr):
    """Row i of a [TILE, BLOCK_C] tile: the TILE rows are a thread's registers, so this is a register pick."""
    return tl.sum(tl.where(ti == i, tile, -0.0), axis=0)


@triton.jit
def _scan_tile(h, S, A2, dt_bias, D, x, dt, z, Bp, Cp, yp, stride_yt, n_ok, c_ok, ti, n2,
               N: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr, OUTPUT: tl.constexpr,
               FAST: tl.constexpr):
    """Advance h over the first n_ok tokens of a tile (x, dt, z [TILE, BLOCK_C]; B, C rows from Bp, Cp).
    softplus, delta x and the SiLU gate are worked for the whole tile at once, off the state's dependency
    chain; per token only h <- exp2(delta A2) h + delta x B and y = h C. Rows past n_ok get delta = 0 and
    delta x = 0, which leaves h exactly as it is whatever their (finite) B: B and C have TILE zero rows past
    the last token, so their loads need no mask. OUTPUT: store y; else S += the tile's deltas."""
    x = x.to(tl.float32)
    delta = tl.where(ti < n_ok, _softplus_series(dt.to(tl.float32) + dt_bias[None, :], FAST), 0.0)
    dx = delta * x
    if OUTPUT:
        z = z.to(tl.float32)
        if FAST:
            gate = libdevice.fast_dividef(z, 1.0 + tl.exp2(z * -1.4426950408889634))
        else:
            gate = z / (1.0 + tl.exp(-z))
        dxg = D[None, :] * x * gate  # y = (h C) gate + D x gate
    else:
        S += tl.sum(delta, axis=0)
    for i in tl.static_range(TILE):
        Bv = _load_column(Bp + i * N, n2, N, BLOCK_N)
        h = tl.exp2(_row(delta, ti, i)[None, :] * A2) * h + _row(dx, ti, i)[None, :] * Bv
        if OUTPUT:
            Cv = _load_column(Cp + i * N, n2, N, BLOCK_N)
            y = tl.sum(h * Cv, axis=0) * _row(gate, ti, i) + _row(dxg, ti, i)
            tl.store(yp + i * stride_yt, y.to(yp.dtype.element_ty), mask=tl.where(i < n_ok, c_ok, False))
    return h, S


@triton.jit
def _load_inputs(xp, dtp, zp, stride_xt, stride_dtt, stride_zt, n_ok, c_ok, ti, TILE: tl.constexpr,
                 BLOCK_C: tl.constexpr, OUTPUT: tl.constexpr):
    """A tile's x, dt and (if OUTPUT) z, as _load_tile; z is x otherwise (unused)."""
    x = _load_tile(xp, stride_xt, n_ok, c_ok, ti, TILE, BLOCK_C)
    dt = _load_tile(dtp, stride_dtt, n_ok, c_ok, ti, TILE, BLOCK_C)
    if OUTPUT:
        z = _load_tile(zp, stride_zt, n_ok, c_ok, ti, TILE, BLOCK_C)
    else:
        z = x
    return x, dt, z


@triton.jit
def _scan_tokens(h, A2, dt_bias, D, x_cp, dt_cp, z_cp, B_ptr, C_ptr, y_cp, t_lo, t_hi, c_ok, n2,
                 stride_xt, stride_dtt, stride_zt, stride_yt, N: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_C: tl.constexpr, TILE: tl.constexpr, OUTPUT: tl.constexpr, FAST: tl.constexpr):
    """Advance the state h [BLOCK_N, BLOCK_C] over tokens t_lo..t_hi-1 (t_lo < t_hi) of one sequence, TILE
    tokens a step (a loop that is not unrolled; the last tile masked). The next tile's x, dt, z (BLOCK_C
    channels a token, coalesced) are loaded while the current one is worked, into loop-carried registers, so a
    token's DRAM latency is hidden behind a tile of work; B and C ([T, N] fp32) are L1/L2-resident scalars,
    loaded in the tile's body. Pointers advance by the strides (no per-token 64-bit index math). A2 = A log2(e).
    OUTPUT: write y_t = (h_t C_t + D x_t) SiLU(z_t); else return the sum of delta over the tokens too."""
    S = tl.zeros_like(dt_bias)
    ti = tl.arange(0, TILE)[:, None]
    t64 = t_lo.to(tl.int64)  # int64 token offsets: T x stride can pass 2^31
    xp = x_cp + t64 * stride_xt
    dtp = dt_cp + t64 * stride_dtt
    zp = z_cp + t64 * stride_zt
    Bp = B_ptr + t64 * N
    Cp = C_ptr + t64 * N
    yp = y_cp + t64 * stride_yt
    x, dt, z = _load_inputs(xp, dtp, zp, stride_xt, stride_dtt, stride_zt, t_hi - t_lo, c_ok, ti, TILE, BLOCK_C,
                            OUTPUT)
    for t0 in tl.range(t_lo, t_hi, TILE):
        xp += TILE * stride_xt
        dtp += TILE * stride_dtt
        zp += TILE * stride_zt
        x1, dt1, z1 = _load_inputs(xp, dtp, zp, stride_xt, stride_dtt, stride_zt, t_hi - t0 - TILE, c_ok, ti, TILE,
                                   BLOCK_C, OUTPUT)
        h, S = _scan_tile(h, S, A2, dt_bias, D, x, dt, z, Bp, Cp, yp, stride_yt, t_hi - t0, c_ok, ti, n2, N, BLOCK_N,
                          TILE, OUTPUT, FAST)
        Bp += TILE * N
        Cp += TILE * N
        yp += TILE * stride_yt
        x, dt, z = x1, dt1, z1
    return h, S


@triton.jit
def _count_below(qsl_ptr, NSEQ, v_lo, v_hi, BLOCK_S: tl.constexpr):
    """(#sequences starting before v_lo, #starting before v_hi): qsl is sorted, so these index sequences."""
    lo = 0
    hi = 0
    for i in range(0, NSEQ, BLOCK_S):
        j = i + tl.arange(0, BLOCK_S)
        q = tl.load(qsl_ptr + j, mask=j < NSEQ, other=2147483647)
        lo += tl.sum((q < v_lo).to(tl.int32))
        hi += tl.sum((q < v_hi).to(tl.int32))
    return lo, hi


# Strides of the channel axis are not specialized (a stride of 1 would let Triton vectorize those loads two
# channels a thread, a layout that the [N, channel] arithmetic does not have: shared-memory shuffles per token).
# Neither are the token and sequence counts: each variant of these kernels compiles for ~27 s on an H200, and
# Triton would compile one for T or NSEQ equal to 1 or divisible by 16 (a stall of every request the first
# time a batch of such a shape comes).
@triton.jit(do_not_specialize=["T", "NSEQ", "stride_xc", "stride_dtc", "stride_dtb", "stride_hc", "stride_dc"])
def _scan_chunk_state_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, dt_bias_ptr, qsl_ptr, slots_ptr, hend_ptr, dsum_ptr,
                             T, NSEQ, L, CH: tl.constexpr, N: tl.constexpr,
                             stride_xt, stride_xc, stride_dtt, stride_dtc, stride_Ac, stride_An,
                             stride_dtb, stride_hk, stride_hn, stride_hc, stride_dk, stride_dc,
                             BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, TILE: tl.constexpr,
                             FAST: tl.constexpr):
    """Pass 1, chunk program_id(0) x channels program_id(1)*BLOCK_C...: if the sequence holding the chunk's
    last token goes on past the chunk, scan its tokens in this chunk from a zero state; write that local end
    state to hend[chunk] ([N, CH]) and the sum of its deltas to dsum[chunk] ([CH])."""
    k = tl.program_id(0)
    s0 = k * L
    e0 = tl.minimum(s0 + L, T)
    _, j = _count_below(qsl_ptr, NSEQ, e0, e0, BLOCK_S)
    j -= 1  # the last sequence starting before e0
    if j < 0:
        return
    if tl.load(qsl_ptr + j + 1) <= e0:
        return
    if tl.load(slots_ptr + j) < 0:
        return
    t_lo = tl.maximum(tl.load(qsl_ptr + j), s0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n2 = tl.arange(0, BLOCK_N)[:, None]
    c_ok = _channel_mask(c, CH, BLOCK_C)
    A2 = _load_rows(A_ptr + c * stride_Ac, stride_An, n2, c_ok, N, BLOCK_N, BLOCK_C) * 1.4426950408889634
    dt_bias = tl.load(dt_bias_ptr + c * stride_dtb, mask=c_ok, other=0.0)
    h = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    h, S = _scan_tokens(h, A2, dt_bias, dt_bias, x_ptr + c * stride_xc, dt_ptr + c * stride_dtc, x_ptr + c,
                        B_ptr, B_ptr, x_ptr + c, t_lo, e0, c_ok, n2, stride_xt, stride_dtt, 0, 0, N, BLOCK_N, BLOCK_C,
                        TILE, OUTPUT=False, FAST=FAST)
    k64 = k.to(tl.int64)
    _store_rows(hend_ptr + k64 * stride_hk + c * stride_hc, stride_hn, h, n2, c_ok, N)
    tl.store(dsum_ptr + k64 * stride_dk + c * stride_dc, S, mask=c_ok)


@triton.jit(do_not_specialize=["stride_hc", "stride_dc"])
def _scan_chunk_carry_kernel(A_ptr, states_ptr, qsl_ptr, slots_ptr, init_ptr, hend_ptr, hinit_ptr, dsum_ptr, L,
                             CH: tl.constexpr, N: tl.constexpr, stride_Ac, stride_An, stride_ss, stride_sc, stride_sn,
                             stride_hk, stride_hn, stride_hc, stride_dk, stride_dc,
                             BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 2, sequence program_id(0) x channels: for a sequence over several chunks k0..k1, copy its initial
    state to hinit[k0] (pass 3 must not read it from the slot, which the program of chunk k1 overwrites),
    then walk the chunk boundaries: h <- exp(A dsum[k]) h + hend[k], overwriting hend[k] with the state at
    the end of chunk k (what pass 3 starts chunk k + 1 from). A few [N, BLOCK_C] steps: microseconds."""
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        return
    start = tl.load(qsl_ptr + b)
    end = tl.load(qsl_ptr + b + 1)
    k0 = start // L
    k1 = (end - 1) // L
    if end <= start or k1 <= k0:
        return
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n2 = tl.arange(0, BLOCK_N)[:, None]
    c_ok = _channel_mask(c, CH, BLOCK_C)
    A2 = _load_rows(A_ptr + c * stride_Ac, stride_An, n2, c_ok, N, BLOCK_N, BLOCK_C) * 1.4426950408889634
    init = tl.load(init_ptr + b) != 0
    h = _load_rows(states_ptr + slot.to(tl.int64) * stride_ss + c * stride_sc, stride_sn, n2,
                   tl.where(init, c_ok, False), N, BLOCK_N, BLOCK_C)
    _store_rows(hinit_ptr + k0.to(tl.int64) * stride_hk + c * stride_hc, stride_hn, h, n2, c_ok, N)
    for k in range(k0.to(tl.int64), k1):
        h_base = hend_ptr + k * stride_hk + c * stride_hc
        S = tl.load(dsum_ptr + k * stride_dk + c * stride_dc, mask=c_ok, other=0.0)
        h = tl.exp2(A2 * S[None, :]) * h + _load_rows(h_base, stride_hn, n2, c_ok, N, BLOCK_N, BLOCK_C)
        _store_rows(h_base, stride_hn, h, n2, c_ok, N)


@triton.jit(do_not_specialize=["T", "NSEQ", "stride_xc", "stride_dtc", "stride_zc", "stride_yc", "stride_D",
                               "stride_dtb", "stride_hc"])
def _scan_chunk_output_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, states_ptr,
                              qsl_ptr, slots_ptr, init_ptr, y_ptr, hend_ptr, hinit_ptr, T, NSEQ, L,
                              CH: tl.constexpr, N: tl.constexpr,
                              stride_xt, stride_xc, stride_dtt, stride_dtc, stride_Ac, stride_An,
                              stride_zt, stride_zc,
                              stride_D, stride_dtb, stride_ss, stride_sc, stride_sn, stride_yt, stride_yc,
                              stride_hk, stride_hn, stride_hc, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_S: tl.constexpr, TILE: tl.constexpr, FAST: tl.constexpr):
    """Pass 3, chunk program_id(0) x channels: for each sequence with tokens in the chunk (or empty and
    starting in it), scan its tokens here from the state it enters the chunk with (hend[chunk - 1] from
    pass 2 if it started in an earlier chunk; hinit[chunk] if it starts here and goes on past the chunk;
    else its initial state or zeros), writing y; the sequence that ends in the chunk writes its final state
    to its slot."""
    k = tl.program_id(0)
    s0 = k * L
    e0 = tl.minimum(s0 + L, T)
    is_last = k == tl.num_programs(0) - 1
    a, b_hi = _count_below(qsl_ptr, NSEQ, s0, tl.where(is_last, 2147483647, e0), BLOCK_S)
    b_lo = a
    if a > 0:
        if tl.load(qsl_ptr + a) > s0:  # sequence a - 1 started before the chunk and runs into it
            b_lo = a - 1
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n2 = tl.arange(0, BLOCK_N)[:, None]
    c_ok = _channel_mask(c, CH, BLOCK_C)
    A2 = _load_rows(A_ptr + c * stride_Ac, stride_An, n2, c_ok, N, BLOCK_N, BLOCK_C) * 1.4426950408889634
    D = tl.load(D_ptr + c * stride_D, mask=c_ok, other=0.0)
    dt_bias = tl.load(dt_bias_ptr + c * stride_dtb, mask=c_ok, other=0.0)
    k64 = k.to(tl.int64)
    for j in range(b_lo, b_hi):
        slot = tl.load(slots_ptr + j)
        if slot >= 0:
            q0 = tl.load(qsl_ptr + j)
            q1 = tl.load(qsl_ptr + j + 1)
            if q0 < s0:
                h = _load_rows(hend_ptr + (k64 - 1) * stride_hk + c * stride_hc, stride_hn, n2, c_ok, N, BLOCK_N,
                               BLOCK_C)
            elif q1 > e0:
                h = _load_rows(hinit_ptr + k64 * stride_hk + c * stride_hc, stride_hn, n2, c_ok, N, BLOCK_N,
                               BLOCK_C)
            else:
                init = tl.load(init_ptr + j) != 0
                h = _load_rows(states_ptr + slot.to(tl.int64) * stride_ss + c * stride_sc, stride_sn, n2,
                               tl.where(init, c_ok, False), N, BLOCK_N, BLOCK_C)
            t_lo = tl.maximum(q0, s0)
            t_hi = tl.minimum(q1, e0)
            if t_lo < t_hi:  # else an empty sequence: its state goes back as it came
                h, _ = _scan_tokens(h, A2, dt_bias, D, x_ptr + c * stride_xc, dt_ptr + c * stride_dtc,
                                    z_ptr + c * stride_zc, B_ptr, C_ptr, y_ptr + c * stride_yc, t_lo, t_hi, c_ok, n2,
                                    stride_xt, stride_dtt, stride_zt, stride_yt, N, BLOCK_N, BLOCK_C, TILE,
                                    OUTPUT=True, FAST=FAST)
            if q1 <= e0:
                _store_rows(states_ptr + slot.to(tl.int64) * stride_ss + c * stride_sc, stride_sn, h, n2, c_ok, N)


# Prefill blocking, measured on an H100 (triton 3.6) at FalconMamba-7B shapes, do_bench median us for 4,096 tokens
# as one sequence / as 16 x 256 (the kernel before this one: 1369 / 1304):
#   channels a thread 1, chains  98304 (12 chunks):  841 / 801   <- chosen: the long single sequence matters most
#   channels a thread 1, chains  65536  (8 chunks): 1129 / 634
#   channels a thread 1, chains  49152  (6 chunks):  995 / 918
#   channels a thread 2, chains  65536  (8 chunks):  990 / 720
#   channels a thread 2, chains 131072 (16 chunks): 1007 / 718
# Chunk boundaries inside a sequence cost pass-1 work (16 x 256 with 512-token chunks has none).
# Those were of the per-token loop; the tiled loop keeps that blocking until the sweep
# (benchmarks/kernels_mamba.py --mamba1-sweep) is run. TILE 8: 168 registers in pass 3, no spills (sm_90 ptxas).
@dataclass(frozen=True)
class PrefillBlocking:
    """How selective_scan_varlen cuts its work (the measured choices above)."""
    tile: int = 8  # tokens a step of the token loop: the next tile's inputs load while this one is worked
    warps: int = 4
    channels_per_thread: int = 1
    chains: int = 98304  # chunk the token axis until chunks x channels reaches this many independent scans
    min_chunk: int = 64

    @property
    def block_c(self) -> int:
        return self.channels_per_thread * 32 * self.warps


PREFILL_BLOCKING = PrefillBlocking()
SEQ_BLOCK = 64  # sequence starts a step of _count_below: fixed, so no batch size compiles a kernel variant


def selective_scan_varlen(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                          ssm_states: torch.Tensor, query_start_loc: torch.Tensor, state_slots: torch.Tensor,
                          has_initial_state: torch.Tensor, blocking: PrefillBlocking | None = None) -> torch.Tensor:
    """Triton version of selective_scan_varlen_ref (same arguments and result; no host sync); `blocking`:
    PREFILL_BLOCKING unless given.

    The recurrence is sequential in time, and one sequence alone has only d_inner x N independent scans
    (131K at FalconMamba-7B, one channel's N states a thread: 8K threads, too few for a GPU), so the flat token
    axis is cut into chunks of L tokens (L from T and d_inner only, so no sync) and worked in three passes:
      1. per chunk, for the sequence that runs on past its end: its local end state from zero over its tokens
         in the chunk, and the sum of delta there (the chunk's decay is exp(A * sum delta)); parallel over
         chunks and channels;
      2. per sequence, a short sequential walk over the chunk boundaries it crosses, turning local end states
         into true ones (chunks x d_inner x N elements, microseconds);
      3. per chunk, every sequence segment in it rescanned from its true incoming state, writing y and, where
         the sequence ends, its final state.
    Passes 1 and 2 are skipped when one chunk holds all tokens; pass 1 does nothing for chunks whose last
    sequence ends in them. Blocking: BLOCK_C channels a program, blocking.channels_per_thread a thread with
    their N states and A * log2(e) in registers, so the per-channel math (softplus, SiLU) is not replicated,
    the y = h C reduction stays in the thread, and the x/dt/z/y accesses of one token are coalesced across
    the warp; the per-token cost is N exp2 + 4N FMA-pipe ops + ~30 per-channel ops a channel. Memory is only
    touched by 1D [BLOCK_C] accesses and scalars, so the [N, BLOCK_C] arithmetic keeps that layout (a 2D load
    could give it another, with shared-memory shuffles and warp shuffles every token).

    Where it stands: the per-token loop before this one took ~0.84 ms for 4,096 tokens on an H100 (~0.81 on
    an H200) against ~0.3 ms of exp2 throughput (2 x 16 exp2 per channel-token: passes 1 and 3), latency-bound:
    every token waited on DRAM. The token loop now works blocking.tile tokens a step with the next tile's
    inputs in flight (sm_90 SASS at the default blocking: ~171 instructions a token in pass 3, no spills):
    predicted 0.35-0.5 ms, measured 0.71 ms for 4,096 tokens on the H200 (benchmarks/RESULTS.md): a third fewer
    instructions bought an eighth of the time, so the loop is not bound by issue."""
    T, CH = x.shape
    N = A.shape[1]
    num_seqs = state_slots.shape[0]
    y = torch.empty_like(x)
    if T == 0 or num_seqs == 0:
        return y
    blocking = blocking or PREFILL_BLOCKING
    BLOCK_C, TILE = blocking.block_c, blocking.tile
    fast = x.device.type == "cuda"
    BLOCK_N = triton.next_power_of_2(N)
    n_chunks = max(1, min(triton.cdiv(blocking.chains, CH), triton.cdiv(T, blocking.min_chunk)))
    L = triton.cdiv(triton.cdiv(T, n_chunks), 16) * 16
    n_chunks = triton.cdiv(T, L)
    c_blocks = triton.cdiv(CH, BLOCK_C)
    # B and C are read by every thread for every token: converted once here ([T, N], microseconds), the
    # token loop loads them ready, contiguous (a token's N values at constant offsets from one address), with
    # TILE zero rows after the last token (a last tile's loads past it need no mask).
    B, C = (F.pad(v.float(), (0, 0, 0, TILE)) for v in (B, C))
    if n_chunks > 1:
        hbuf = torch.empty(2, n_chunks, N, CH, device=x.device, dtype=torch.float32)  # hend, hinit
        dsum = torch.empty(n_chunks, CH, device=x.device, dtype=torch.float32)
        _scan_chunk_state_kernel[(n_chunks, c_blocks)](
            x, dt, A, B, dt_bias, query_start_loc, state_slots, hbuf[0], dsum, T, num_seqs, L, CH, N,
            *x.stride(), *dt.stride(), *A.stride(), dt_bias.stride(0), *hbuf[0].stride(), *dsum.stride(),
            BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, BLOCK_S=SEQ_BLOCK, TILE=TILE, FAST=fast,
            num_warps=blocking.warps)
        _scan_chunk_carry_kernel[(num_seqs, triton.cdiv(CH, 128))](
            A, ssm_states, query_start_loc, state_slots, has_initial_state, hbuf[0], hbuf[1], dsum, L, CH, N,
            *A.stride(), *ssm_states.stride(), *hbuf[0].stride(), *dsum.stride(), BLOCK_C=128, BLOCK_N=BLOCK_N,
            num_warps=4)
        hend, hinit, h_strides = hbuf[0], hbuf[1], hbuf[0].stride()
    else:
        hend, hinit, h_strides = A, A, (0, 0, 0)  # never read: no sequence crosses a chunk boundary
    _scan_chunk_output_kernel[(n_chunks, c_blocks)](
        x, dt, A, B, C, D, dt_bias, z, ssm_states, query_start_loc, state_slots, has_initial_state, y, hend, hinit,
        T, num_seqs, L, CH, N,
        *x.stride(), *dt.stride(), *A.stride(), *z.stride(), D.stride(0), dt_bias.stride(0), *ssm_states.stride(),
        *y.stride(), *h_strides, BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, BLOCK_S=SEQ_BLOCK, TILE=TILE, FAST=fast,
        num_warps=blocking.warps)
    return y


@triton.jit
def _selective_scan_update_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, states_ptr,
                                  slots_ptr, y_ptr, dl_ptr, CH, N, R, eps,
                                  stride_xb, stride_xc, stride_dtb, stride_dtc, stride_Ac, stride_An,
                                  stride_Bb, stride_Bn, stride_Cb, stride_Cn, stride_zb, stride_zc,
                                  stride_ss, stride_sc, stride_sn, stride_yb, stride_yc, stride_dlb,
                                  NORM_BCDT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr):
    """One decode step of sequence program_id(1) over BLOCK_C channels x all N states, in place by slot:
    one read and one write of the state tile; full N per program so y = h C reduces in registers.
    NORM_BCDT (FalconMamba): B and C are RMS-normalised here (rounded to their dtype, as the norm kernel
    stores them) and dt scaled by rsqrt(mean(dl^2) + eps) of the R-wide dl row."""
    b = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CH
    y_ptrs = y_ptr + b * stride_yb + c * stride_yc
    wait_for_predecessor(USE_PDL)  # before the early return too: every program waits (kernels/pdl.py)
    slot = tl.load(slots_ptr + b)
    if slot < 0:
        tl.store(y_ptrs, tl.zeros((BLOCK_C,), y_ptr.dtype.element_ty), mask=c_ok)
        return
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    cn_ok = c_ok[:, None] & n_ok[None, :]
    x = tl.load(x_ptr + b * stride_xb + c * stride_xc, mask=c_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + c * stride_zc, mask=c_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dtb + c * stride_dtc, mask=c_ok, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + c[:, None] * stride_Ac + n[None, :] * stride_An, mask=cn_ok, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_Bb + n * stride_Bn, mask=n_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_Cb + n * stride_Cn, mask=n_ok, other=0.0).to(tl.float32)
    if NORM_BCDT:
        dtype = B_ptr.dtype.element_ty
        Bv = (Bv * tl.rsqrt(tl.sum(Bv * Bv, 0) / N + eps)).to(dtype).to(tl.float32)
        Cv = (Cv * tl.rsqrt(tl.sum(Cv * Cv, 0) / N + eps)).to(dtype).to(tl.float32)
        r = tl.arange(0, BLOCK_R)
        dl = tl.load(dl_ptr + b * stride_dlb + r, mask=r < R, other=0.0).to(tl.float32)
        dt = dt * tl.rsqrt(tl.sum(dl * dl, 0) / R + eps)
    delta = softplus(dt + tl.load(dt_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32))
    s_ptrs = states_ptr + slot.to(tl.int64) * stride_ss + c[:, None] * stride_sc + n[None, :] * stride_sn
    state = tl.load(s_ptrs, mask=cn_ok, other=0.0).to(tl.float32)
    state = tl.exp(delta[:, None] * A) * state + (delta * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, state.to(states_ptr.dtype.element_ty), mask=cn_ok)
    y = tl.sum(state * Cv[None, :], axis=1) + tl.load(D_ptr + c, mask=c_ok, other=0.0).to(tl.float32) * x
    tl.store(y_ptrs, (y * z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=c_ok)


def selective_scan_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                          ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """Triton version of selective_scan_update_ref (same arguments and result; CUDA-graph capturable)."""
    return _update(x, dt, A, B, C, D, dt_bias, z, ssm_states, state_slots, None, 0.0)


def _update(x, dt, A, B, C, D, dt_bias, z, ssm_states, state_slots, dl: torch.Tensor | None, eps: float
            ) -> torch.Tensor:
    """The update kernel's launch; dl given: B, C and dt normalised in it (NORM_BCDT)."""
    Bt, CH = x.shape
    N = A.shape[1]
    y = torch.empty_like(x)
    if Bt == 0:
        return y
    BLOCK_N = triton.next_power_of_2(N)
    # ~4K state elements a program, fewer channels while the grid would be under ~1024 programs.
    BLOCK_C = min(triton.next_power_of_2(CH), max(16, 4096 // BLOCK_N))
    while BLOCK_C > 16 and Bt * triton.cdiv(CH, BLOCK_C) < 1024:
        BLOCK_C //= 2
    R = 0 if dl is None else dl.shape[1]
    _selective_scan_update_kernel[(triton.cdiv(CH, BLOCK_C), Bt)](
        x, dt, A, B, C, D, dt_bias, z, ssm_states, state_slots, y, x if dl is None else dl, CH, N, R, eps,
        *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z.stride(), *ssm_states.stride(),
        *y.stride(), 0 if dl is None else dl.stride(0), NORM_BCDT=dl is not None, BLOCK_C=BLOCK_C,
        BLOCK_N=BLOCK_N, BLOCK_R=triton.next_power_of_2(max(R, 1)), num_warps=4, **pdl.launch_kwargs(x.device))
    return y


def selective_scan_update_bcdt_norm_ref(x: torch.Tensor, dt: torch.Tensor, dlBC: torch.Tensor, eps: float,
                                        A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                                        ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """FalconMamba's decode step from the raw x_proj row dlBC = [dl | B | C] [Bt, R + 2N] and dt = dl W_dt^T of
    the raw dl: rms(dl) = s dl with s = rsqrt(mean(dl^2) + eps), so W_dt rms(dl) = s dt (in fp32); B and C
    RMS-normalised (weightless) here. Then selective_scan_update_ref."""
    N = A.shape[1]
    dl, B, C = dlBC.split([dlBC.shape[1] - 2 * N, N, N], dim=-1)
    dt = dt.float() * torch.rsqrt(dl.float().pow(2).mean(-1, keepdim=True) + eps)
    B, C = rms_norm_ref(B, None, eps), rms_norm_ref(C, None, eps)
    return selective_scan_update_ref(x, dt, A, B, C, D, dt_bias, z, ssm_states, state_slots)


def selective_scan_update_bcdt_norm(x: torch.Tensor, dt: torch.Tensor, dlBC: torch.Tensor, eps: float,
                                    A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor,
                                    ssm_states: torch.Tensor, state_slots: torch.Tensor) -> torch.Tensor:
    """Triton version of selective_scan_update_bcdt_norm_ref: the norms inside the state update's kernel."""
    N = A.shape[1]
    dl, B, C = dlBC.split([dlBC.shape[1] - 2 * N, N, N], dim=-1)
    return _update(x, dt, A, B, C, D, dt_bias, z, ssm_states, state_slots, dl, eps)
