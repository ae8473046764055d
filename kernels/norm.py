"""RMSNorm (optionally fused with the residual add of one or two deltas), weightless RMSNorm of each column
segment of a row (FalconMamba's dt, B and C in one launch), and grouped gated RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl
from kernels.pdl import wait_for_predecessor


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w * cast_back(x * rsqrt(mean(x^2) + eps)), statistics in fp32; weight None = weightless."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def split_rms_norm_ref(x: torch.Tensor, sizes: list[int], eps: float) -> torch.Tensor:
    """x [T, sum(sizes)] with each column segment (sizes, in order) normalised alone, weightless."""
    return torch.cat([rms_norm_ref(part, None, eps) for part in x.split(sizes, dim=-1)], dim=-1)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     x2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x (in the residual's dtype); returns (rms_norm(h cast to weight dtype), h).
    x2: a second delta, summed with x in x's dtype first (h = residual + (x + x2))."""
    if x2 is not None:
        x = x + x2
    h = residual + x.to(residual.dtype)
    return rms_norm_ref(h.to(weight.dtype), weight, eps), h


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                       n_groups: int, norm_before_gate: bool) -> torch.Tensor:
    """Mamba2's gate + grouped RMSNorm on y [T, D]; each of n_groups contiguous slices is normalised alone.

    norm_before_gate: GroupRMS(y) * w * SiLU(z); otherwise GroupRMS(y * SiLU(z)) * w.
    """
    T, D = y.shape
    h = y.float()
    gate = F.silu(z.float())
    if not norm_before_gate:
        h = h * gate
    h = h.view(T, n_groups, D // n_groups)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).view(T, D) * weight.float()
    if norm_before_gate:
        h = h * gate
    return h.to(y.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: each program normalises ROWS rows (several when rows are short, so programs stay busy); the
# whole row (or group) sits in registers, so x is read once and written once.
# ----------------------------------------------------------------------------------------------------------------


def _row_launch(n_rows: int, block_n: int) -> tuple[int, int, int]:
    """(rows per program, grid size, num_warps) for rows padded to block_n elements."""
    rows = max(1, min(32, 2048 // block_n))
    num_warps = max(1, min(16, rows * block_n // 512))
    return rows, triton.cdiv(n_rows, rows), num_warps


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as [rows, cols] with unit column stride (a copy only if no such view exists)."""
    if x.dim() == 2 and x.stride(-1) == 1:
        return x
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    """out = w * cast_x(x * rsqrt(mean(x^2) + eps)) for ROWS rows, statistics in fp32."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    wait_for_predecessor(USE_PDL)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)
    y = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = w[None, :] * y
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of rms_norm_ref with a weight (same dtype rules: weight * normed promotes like torch)."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(n_rows, n_cols, dtype=dtype, device=x.device)
    if n_rows:
        block_n = triton.next_power_of_2(n_cols)
        rows, grid, num_warps = _row_launch(n_rows, block_n)
        _rms_norm_kernel[(grid,)](x2, weight, out, n_rows, n_cols, x2.stride(0), out.stride(0), eps, ROWS=rows,
                                  BLOCK_N=block_n, num_warps=num_warps, **pdl.launch_kwargs(x.device))
    return out.view(x.shape)


@triton.jit
def _split_rms_norm_kernel(x_ptr, out_ptr, n_rows, n_cols, end0, end1, stride_x, eps,
                           ROWS: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    """Columns [0, end0), [end0, end1), [end1, n_cols) of ROWS rows, each normalised alone, statistics in fp32:
    one load of the row, three masked sums of squares, each element scaled by its own segment's rsqrt."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    wait_for_predecessor(USE_PDL)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sq = x * x
    first, second = (cols < end0)[None, :], ((cols >= end0) & (cols < end1))[None, :]
    rstd0 = tl.rsqrt(tl.sum(tl.where(first, sq, 0.0), 1) / end0 + eps)[:, None]
    rstd1 = tl.rsqrt(tl.sum(tl.where(second, sq, 0.0), 1) / (end1 - end0) + eps)[:, None]
    rstd2 = tl.rsqrt(tl.sum(tl.where(first | second, 0.0, sq), 1) / (n_cols - end1) + eps)[:, None]
    y = x * tl.where(first, rstd0, tl.where(second, rstd1, rstd2))
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def split_rms_norm(x: torch.Tensor, sizes: list[int], eps: float) -> torch.Tensor:
    """Triton version of split_rms_norm_ref for three segments; the output is contiguous."""
    assert len(sizes) == 3 and min(sizes) > 0 and sum(sizes) == x.shape[-1], sizes
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    if n_rows:
        block_n = triton.next_power_of_2(n_cols)
        rows, grid, num_warps = _row_launch(n_rows, block_n)
        _split_rms_norm_kernel[(grid,)](x2, out, n_rows, n_cols, sizes[0], sizes[0] + sizes[1], x2.stride(0), eps,
                                        ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
                                        **pdl.launch_kwargs(x.device))
    return out.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, x2_ptr, res_ptr, w_ptr, out_ptr, h_ptr, n_rows, n_cols, stride_x, stride_x2,
                         stride_res, eps, HAS_X2: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """h = residual + x rounded to the residual's dtype (stored); out = w * cast_w(hw * rsqrt(mean(hw^2) + eps))
    with hw = h cast to the weight's dtype. HAS_X2: x is x + x2 rounded to x's dtype (as torch adds them).
    Outputs are contiguous."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    res_dtype = h_ptr.dtype.element_ty
    w_dtype = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    wait_for_predecessor(USE_PDL)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_X2:
        x2 = tl.load(x2_ptr + rows[:, None] * stride_x2 + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + x2.to(tl.float32)).to(x_ptr.dtype.element_ty)
    r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
    h = (r.to(tl.float32) + x.to(res_dtype).to(tl.float32)).to(res_dtype)
    tl.store(h_ptr + rows[:, None] * n_cols + cols[None, :], h, mask=mask)
    hw = h.to(w_dtype).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hw * hw, 1) / n_cols + eps)
    y = w[None, :] * (hw * rstd[:, None]).to(w_dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], y.to(w_dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 x2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of add_rms_norm_ref: one pass returns (rms_norm(h), h), h = residual + x (+ x2)."""
    xr, r2 = _as_rows(x), _as_rows(residual)
    x2r = xr if x2 is None else _as_rows(x2)
    n_rows, n_cols = xr.shape
    out = torch.empty(n_rows, n_cols, dtype=weight.dtype, device=x.device)
    h = torch.empty(n_rows, n_cols, dtype=residual.dtype, device=x.device)
    if n_rows:
        block_n = triton.next_power_of_2(n_cols)
        rows, grid, num_warps = _row_launch(n_rows, block_n)
        _add_rms_norm_kernel[(grid,)](xr, x2r, r2, weight, out, h, n_rows, n_cols, xr.stride(0), x2r.stride(0),
                                      r2.stride(0), eps, HAS_X2=x2 is not None, ROWS=rows, BLOCK_N=block_n,
                                      num_warps=num_warps, **pdl.launch_kwargs(x.device))
    return out.view(residual.shape), h.view(residual.shape)


@triton.jit
def _gated_rms_norm_kernel(y_ptr, z_ptr, w_ptr, out_ptr, n_rows, group_size, stride_y, stride_z, eps,
                           NORM_BEFORE_GATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """Program (row block, group): RMS-normalises one contiguous group of ROWS rows, with the SiLU(z) gate
    applied after (NORM_BEFORE_GATE) or before the normalisation; all in fp32."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK_N)
    col_mask = tl.arange(0, BLOCK_N) < group_size
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    wait_for_predecessor(USE_PDL)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)
    h = y if NORM_BEFORE_GATE else y * gate
    rstd = tl.rsqrt(tl.sum(h * h, 1) / group_size + eps)
    h = h * rstd[:, None] * w[None, :]
    if NORM_BEFORE_GATE:
        h = h * gate
    n_cols = tl.num_programs(1) * group_size
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   n_groups: int, norm_before_gate: bool) -> torch.Tensor:
    """Triton version of gated_rms_norm_ref."""
    y2, z2 = _as_rows(y), _as_rows(z)
    n_rows, n_cols = y2.shape
    out = torch.empty(n_rows, n_cols, dtype=y.dtype, device=y.device)
    if n_rows:
        group_size = n_cols // n_groups
        block_n = triton.next_power_of_2(group_size)
        rows, grid, num_warps = _row_launch(n_rows, block_n)
        _gated_rms_norm_kernel[(grid, n_groups)](y2, z2, weight, out, n_rows, group_size, y2.stride(0),
                                                 z2.stride(0), eps, NORM_BEFORE_GATE=norm_before_gate, ROWS=rows,
                                                 BLOCK_N=block_n, num_warps=num_warps, **pdl.launch_kwargs(y.device))
    return out.view(y.shape)
