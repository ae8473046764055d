"""NeoX (rotate-half) rotary position embedding over the full head_dim."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T], inv_freq [D/2] fp32.

    angle = pos * inv_freq (fp32); x' = x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
    """
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per token computes the D/2 angles once and rotates all its q and k heads.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(x_ptr, out_ptr, t, stride_xt, stride_xh, cos, sin,
                  NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin for the NUM_HEADS heads of token t, rounded like the torch
    reference: cos/sin cast to x's dtype and each product rounded to it before the sum."""
    h = tl.arange(0, H_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + t * stride_xt + h * stride_xh + i
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos.to(dtype).to(tl.float32)[None, :]
    s = sin.to(dtype).to(tl.float32)[None, :]
    o1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    out_row = out_ptr + t * (NUM_HEADS * 2 * HALF) + h * (2 * HALF) + i
    tl.store(out_row, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, inv_freq_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh,
                 Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Token t: angle = fp32(position) * inv_freq (one fp32 product, like the reference), then q and k."""
    t = tl.program_id(0)
    i = tl.arange(0, HALF_PAD)
    pos = tl.load(positions_ptr + t).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    _rotate_heads(q_ptr, q_out_ptr, t, stride_qt, stride_qh, cos, sin, Q_HEADS, QH_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, t, stride_kt, stride_kh, cos, sin, K_HEADS, KH_PAD, HALF, HALF_PAD)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rope_ref; returns new contiguous (q, k). cos/sin are fp32 cos/sin of the same fp32
    angles as the reference, so results agree to the last bit up to a 1-2 ulp difference of cos/sin."""
    T, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        half = head_dim // 2
        _rope_kernel[(T,)](q, k, q_out, k_out, positions, inv_freq.float(), q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), Q_HEADS=q_heads, K_HEADS=k_heads, QH_PAD=triton.next_power_of_2(q_heads),
                           KH_PAD=triton.next_power_of_2(k_heads), HALF=half,
                           HALF_PAD=triton.next_power_of_2(half), num_warps=4 if q_heads * head_dim >= 1024 else 1)
    return q_out, k_out
