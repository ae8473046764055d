"""Batched multi-adapter LoRA: every row of the flat batch carries an adapter slot (< 0: none), and the
projection's output gets that adapter's delta, y += (x A^T) B^T, in two steps:

    shrink:  h[t]          = A[slot_t] @ x[t]                              A stack [L, S*R, K] -> h [T, S*R] fp32
    expand:  y[t, n0:n1]  += B[slot_t, n0:n1] @ h[t, s*R:(s+1)*R]        for each slice s = [n0, n1) of y

A fused projection computes S slices (e.g. Mamba in_proj | q | k | v); slice s of an adapter owns rows
s*R .. s*R+R-1 of its A and output columns slice_starts[s] .. slice_starts[s+1]-1 of its B. R is the stacks'
rank (--max-lora-rank): a smaller adapter is zero-padded, a slice it does not target is all zeros. Its
scaling (and Falcon-H1's multipliers) are folded into B.

When the base projection is a plain matrix W, the shrink rides along its matmul instead: W is stored with
every slot's A stacked under it, [W; A_0; ...; A_{L-1}], so one matmul gives y and h_all [T, L*S*R], and
the expand reads row t's h at slot_t * S*R (slot_stride); one small launch per projection instead of two.

The kernels take the rows grouped by slot (`group_rows`, once per forward, on the device): a program
handles a block of one slot's rows, so each adapter's weights are read once per tile and multiplied with
all those rows at once (tl.dot); slots no row uses cost empty programs. Stacks have a fixed size and the
grid depends only on shapes, so CUDA graphs capture the kernels once, whichever adapters are loaded.
No atomics: the shrink's split-K partial sums are added by the expand, so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class LoRARows:
    """The adapter slot of each row of a batch, and the rows grouped by slot."""

    row_slots: torch.Tensor  # [T] int32, < 0: no adapter
    sorted_rows: torch.Tensor  # [T] int32, row indices ordered by slot (rows without an adapter last)
    slot_starts: torch.Tensor  # [L+1] int32: slot l's rows are sorted_rows[slot_starts[l]:slot_starts[l+1]]
    # The kernels' row blocks: block j holds sorted_rows[block_start[j]:min(+BLOCK_M, end of its slot)] of
    # slot block_slot[j] (-1: no block). cdiv(T, BLOCK_M) + L blocks bound every split of the rows.
    block_slot: torch.Tensor  # [cdiv(T, BLOCK_M) + L] int32
    block_start: torch.Tensor  # [cdiv(T, BLOCK_M) + L] int32
    block_m: int


def block_m(num_rows: int) -> int:
    return 16 if num_rows <= 256 else 64  # decode: a few rows per adapter; prefill: many


def group_rows(row_slots: torch.Tensor, num_slots: int) -> LoRARows:
    """Device ops only (no host sync), so it can run inside a captured CUDA graph."""
    device, bm = row_slots.device, block_m(row_slots.shape[0])
    key = torch.where(row_slots < 0, num_slots, row_slots)
    sorted_rows = torch.argsort(key, stable=True).to(torch.int32)
    counts = (key[None, :] == torch.arange(num_slots, device=device)[:, None]).sum(1)
    starts = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
    starts[1:] = counts.cumsum(0)
    blocks = (counts + bm - 1) // bm  # per slot
    blocks_end = blocks.cumsum(0)
    j = torch.arange(-(-row_slots.shape[0] // bm) + num_slots, device=device)
    slot = torch.searchsorted(blocks_end, j, right=True)  # num_slots: past the last block
    valid = slot < num_slots
    slot = slot.clamp(max=num_slots - 1)
    start = starts[slot] + (j - (blocks_end[slot] - blocks[slot])) * bm
    return LoRARows(row_slots, sorted_rows, starts, torch.where(valid, slot, -1).to(torch.int32),
                    start.to(torch.int32), bm)


def lora_shrink_ref(x: torch.Tensor, a_stack: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """h [1, T, S*R] fp32: x [T, K] times the A of each row's slot (rows without an adapter: zeros). The
    leading axis holds partial sums over K that expand adds up (the kernel splits K; here there is one)."""
    h = x.new_zeros(1, x.shape[0], a_stack.shape[1], dtype=torch.float32)
    for slot in rows.row_slots.unique().tolist():
        if slot >= 0:
            mask = rows.row_slots == slot
            h[0, mask] = x[mask].float() @ a_stack[slot].float().t()
    return h


def lora_expand_ref(h: torch.Tensor, b_stack: torch.Tensor, slice_starts: torch.Tensor, widest: int, rows: LoRARows,
                    out: torch.Tensor, slot_stride: int = 0) -> torch.Tensor:
    """out [T, N] += per row and slice, B's slice rows times h's slice (in place; other rows unchanged).
    slice_starts [S+1] int32: the slices' output columns; widest: the widest slice (sizes the kernel's grid);
    slot_stride: h's columns of slot l start at l * slot_stride (h_all of every slot), else at 0."""
    R, bounds, h = b_stack.shape[2], slice_starts.tolist(), h.float().sum(0)
    for slot in rows.row_slots.unique().tolist():
        if slot >= 0:
            mask, h0 = rows.row_slots == slot, slot * slot_stride
            for s, (n0, n1) in enumerate(zip(bounds, bounds[1:])):
                delta = h[mask, h0 + s * R:h0 + (s + 1) * R] @ b_stack[slot, n0:n1].float().t()
                out[mask, n0:n1] = (out[mask, n0:n1].float() + delta).to(out.dtype)
    return out


# Both kernels: grid axis 0 = row block (LoRARows.block_*): one slot's rows. The unused blocks exit at
# once, so the grid depends on T and L alone, not on the rows' slots.

@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, rows_ptr, starts_ptr, block_slot_ptr, block_start_ptr, N, K, k_per_split,
                   stride_x, stride_al, stride_an, stride_hp, stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    slot = tl.load(block_slot_ptr + tl.program_id(0))
    n_tile, part = tl.program_id(1) // SPLIT_K, tl.program_id(1) % SPLIT_K
    if slot >= 0:
        m0 = tl.load(block_start_ptr + tl.program_id(0))
        end = tl.load(starts_ptr + slot + 1)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < end, offs_n < N
        rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
        a_base = a_ptr + slot.to(tl.int64) * stride_al + offs_n[None, :] * stride_an
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(part * k_per_split, (part + 1) * k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            a = tl.load(a_base + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.dot(x, a, input_precision=PRECISION)
        tl.store(h_ptr + part * stride_hp + rows[:, None] * stride_h + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, rows_ptr, starts_ptr, block_slot_ptr, block_start_ptr, slice_starts_ptr, out_ptr, R,
                   slot_stride, stride_hp, stride_h, stride_bl, stride_bn, stride_o, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
    slot = tl.load(block_slot_ptr + tl.program_id(0))
    s = tl.program_id(1)
    n_lo = tl.load(slice_starts_ptr + s) + tl.program_id(2) * BLOCK_N
    n_hi = tl.load(slice_starts_ptr + s + 1)
    if (slot >= 0) & (n_lo < n_hi):  # the grid covers the widest slice and the most row blocks
        m0 = tl.load(block_start_ptr + tl.program_id(0))
        end = tl.load(starts_ptr + slot + 1)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask, n_mask, r_mask = offs_m < end, offs_n < n_hi, offs_r < R
        rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
        h_ptrs = h_ptr + rows[:, None] * stride_h + slot * slot_stride + s * R + offs_r[None, :]
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for part in tl.static_range(SPLIT_K):  # the shrink's partial sums over K
            h += tl.load(h_ptrs + part * stride_hp, mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [R, N]: this slice's B^T
        delta = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
        ptrs = out_ptr + rows[:, None] * stride_o + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(ptrs, mask=mask).to(tl.float32)
        tl.store(ptrs, (y + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32); 16-bit types ignore it


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    """Triton version of lora_shrink_ref, returning [P, T, S*R] partial sums over K: P programs share each
    K range, so that a few decode rows still spread over the GPU. Rows without an adapter stay unwritten
    (expand never reads them)."""
    assert x.dim() == 2 and x.stride(1) == 1 and a_stack.is_contiguous() and x.dtype == a_stack.dtype
    T, K = x.shape
    N = a_stack.shape[1]
    block_n, block_k = max(16, min(64, triton.next_power_of_2(N))), max(16, min(64, triton.next_power_of_2(K)))
    split_k = 1 if T > 256 else max(1, min(16, K // 256))  # prefill: row blocks give the parallelism
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    h = torch.empty(split_k, T, N, dtype=torch.float32, device=x.device)
    if T:
        _shrink_kernel[(rows.block_slot.shape[0], triton.cdiv(N, block_n) * split_k)](
            x, a_stack, h, rows.sorted_rows, rows.slot_starts, rows.block_slot, rows.block_start, N, K, k_per_split,
            x.stride(0), a_stack.stride(0), a_stack.stride(1), h.stride(0), h.stride(1), BLOCK_M=rows.block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, PRECISION=_precision(x.dtype))
    return h


def lora_expand(h: torch.Tensor, b_stack: torch.Tensor, slice_starts: torch.Tensor, widest: int, rows: LoRARows,
                out: torch.Tensor, slot_stride: int = 0) -> torch.Tensor:
    """Triton version of lora_expand_ref, in place on out [T, N] (unit column stride)."""
    assert out.dim() == 2 and out.stride(1) == 1 and b_stack.is_contiguous() and h.stride(2) == 1
    T = out.shape[0]
    R = b_stack.shape[2]
    num_slices = slice_starts.shape[0] - 1
    block_n = max(16, min(128, triton.next_power_of_2(widest)))
    if T:
        _expand_kernel[(rows.block_slot.shape[0], num_slices, triton.cdiv(widest, block_n))](
            h, b_stack, rows.sorted_rows, rows.slot_starts, rows.block_slot, rows.block_start, slice_starts, out, R,
            slot_stride, h.stride(0), h.stride(1), b_stack.stride(0), b_stack.stride(1), out.stride(0),
            BLOCK_M=rows.block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(R)), SPLIT_K=h.shape[0],
            PRECISION=_precision(b_stack.dtype))
    return out
