"""Batched multi-adapter LoRA: every row of the flat batch carries an adapter slot (< 0: none), and the
projection's output gets that adapter's delta, y += (x A^T) B^T, in two steps:

    shrink:  h[t]    = A[slot_t] @ x[t]                      A stack [L, S*R, K] -> h [T, S*R] (fp32)
    expand:  y[t, n] += h[t, s(n)*R : s(n)*R+R] . B[slot_t, n]   B stack [L, N, R], s(n) = col_slice[n]

A fused projection computes S slices (e.g. Mamba in_proj | q | k | v); slice s of an adapter owns rows
s*R..s*R+R-1 of its A and the output columns n with col_slice[n] == s of its B. R is the stack's rank
(--max-lora-rank): a smaller adapter is zero-padded, a slice it does not target is all zeros. The
adapter's scaling (and Falcon-H1's multipliers) are folded into B. Stacks have a fixed size, so CUDA
graphs capture the kernels once, whichever adapters are loaded; rows with slot < 0 are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def lora_shrink_ref(x: torch.Tensor, a_stack: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
    """h [T, S*R] fp32: x [T, K] times the A of each row's slot (rows with slot < 0: zeros)."""
    h = x.new_zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32)
    for slot in row_slots.unique().tolist():
        if slot >= 0:
            rows = row_slots == slot
            h[rows] = x[rows].float() @ a_stack[slot].float().t()
    return h


def lora_expand_ref(h: torch.Tensor, b_stack: torch.Tensor, col_slice: torch.Tensor, row_slots: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """out [T, N] += per row, each output column's slice of h times that column's B row (in place)."""
    rank = b_stack.shape[2]
    cols = torch.arange(rank, device=h.device)[None, :] + col_slice[:, None].long() * rank  # [N, R] into h
    for slot in row_slots.unique().tolist():
        if slot >= 0:
            rows = row_slots == slot
            delta = (h[rows][:, cols] * b_stack[slot].float()[None]).sum(-1)  # [rows, N]
            out[rows] = (out[rows].float() + delta).to(out.dtype)
    return out


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, slots_ptr, N, K, stride_x, stride_al, stride_an, stride_h,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a_rows = a_ptr + slot.to(tl.int64) * stride_al + offs_n[:, None] * stride_an
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_x + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            a = tl.load(a_rows + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
            acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
        tl.store(h_ptr + row * stride_h + offs_n, acc, mask=offs_n < N)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, col_slice_ptr, slots_ptr, out_ptr, N, R, stride_h, stride_bl, stride_bn,
                   stride_o, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        n_mask = offs_n < N
        mask = n_mask[:, None] & (offs_r[None, :] < R)
        s = tl.load(col_slice_ptr + offs_n, mask=n_mask, other=0)
        h = tl.load(h_ptr + row * stride_h + s[:, None] * R + offs_r[None, :], mask=mask, other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None] * stride_bn + offs_r[None, :],
                    mask=mask, other=0.0)
        delta = tl.sum(h * b.to(tl.float32), axis=1)
        y = tl.load(out_ptr + row * stride_o + offs_n, mask=n_mask).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs_n, (y + delta).to(out_ptr.dtype.element_ty), mask=n_mask)


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
    """Triton version of lora_shrink_ref (rows with slot < 0 are left unwritten: expand skips them too)."""
    assert x.dim() == 2 and x.stride(1) == 1 and a_stack.is_contiguous()
    T, K = x.shape
    N = a_stack.shape[1]
    h = torch.empty(T, N, dtype=torch.float32, device=x.device)
    block_n = min(64, triton.next_power_of_2(N))
    if T:
        _shrink_kernel[(T, triton.cdiv(N, block_n))](x, a_stack, h, row_slots, N, K, x.stride(0), a_stack.stride(0),
                                                     a_stack.stride(1), h.stride(0), BLOCK_N=block_n,
                                                     BLOCK_K=min(128, triton.next_power_of_2(K)))
    return h


def lora_expand(h: torch.Tensor, b_stack: torch.Tensor, col_slice: torch.Tensor, row_slots: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """Triton version of lora_expand_ref, in place on out [T, N] (unit column stride)."""
    assert out.dim() == 2 and out.stride(1) == 1 and b_stack.is_contiguous()
    T, N = out.shape
    R = b_stack.shape[2]
    block_n = min(128, triton.next_power_of_2(N))
    if T:
        _expand_kernel[(T, triton.cdiv(N, block_n))](h, b_stack, col_slice, row_slots, out, N, R, h.stride(0),
                                                     b_stack.stride(0), b_stack.stride(1), out.stride(0),
                                                     BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(R))
    return out
