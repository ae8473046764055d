"""NeoX (rotate-half) rotary position embedding over the full head_dim, fused with writing the new tokens'
rotated keys and their values into the paged KV cache (kernels/attention/__init__.py describes its layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.attention import write_kv_ref
from kernels.pdl import wait_for_predecessor


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


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      *, kv_out: torch.Tensor | None = None) -> torch.Tensor:
    """rope_ref on q and k; the rotated k and v go to their KV cache slots (write_kv_ref), and those of every
    token to kv_out [2, T, Hkv, D] when given (for attention to read the new tokens' K / V densely). Returns
    rotated q."""
    q, k = rope_ref(q, k, positions, inv_freq)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    if kv_out is not None:
        kv_out[0].copy_(k)
        kv_out[1].copy_(v)
    return q


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per token computes the D/2 angles once, rotates all its q heads, and writes its
# rotated k heads and its v heads straight into their cache slot (the rotated k never goes through memory).
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(x_row, stride_xh, out_row, stride_oh, cos, sin,
                  NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin for NUM_HEADS heads (x_row, out_row: the token's first head),
    rounded like the torch reference: cos/sin cast to x's dtype and each product rounded to it before the sum."""
    h = tl.arange(0, H_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    dtype = x_row.dtype.element_ty
    x_ptrs = x_row + h * stride_xh + i
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos.to(dtype).to(tl.float32)[None, :]
    s = sin.to(dtype).to(tl.float32)[None, :]
    o1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    out_ptrs = out_row + h * stride_oh + i
    tl.store(out_ptrs, o1.to(dtype).to(out_row.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + HALF, o2.to(dtype).to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kv_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, kv_out_ptr, k_cache_ptr, v_cache_ptr, positions_ptr,
                          inv_freq_ptr, slot_mapping_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                          stride_vh, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                          Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
                          HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          WRITE_KV_OUT: tl.constexpr, USE_PDL: tl.constexpr):
    """Token t: angle = fp32(position) * inv_freq (one fp32 product, like the reference); q to q_out, rotated
    k and v to kv_out[0], kv_out[1] (WRITE_KV_OUT; padding rows too, so every row is finite), and unless
    slot_mapping[t] < 0 (padding), to cache slot = page * BLOCK_SIZE + offset."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    wait_for_predecessor(USE_PDL)  # inv_freq too may be new: the wrapper's .float() can be a copy kernel
    pos = tl.load(positions_ptr + t).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * (Q_HEADS * 2 * HALF), 2 * HALF, cos, sin,
                  Q_HEADS, QH_PAD, HALF, HALF_PAD)
    h = tl.arange(0, KH_PAD)[:, None]
    d = tl.arange(0, 2 * HALF_PAD)[None, :]
    mask = (h < K_HEADS) & (d < 2 * HALF)
    if WRITE_KV_OUT:
        kv_row = K_HEADS * 2 * HALF
        k_out_row = kv_out_ptr + t * kv_row
        _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_out_row, 2 * HALF, cos, sin, K_HEADS, KH_PAD, HALF, HALF_PAD)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_out_row + tl.num_programs(0) * kv_row + h * 2 * HALF + d, v.to(kv_out_ptr.dtype.element_ty),
                 mask=mask)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    page, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, k_cache_ptr + page * stride_kcb + offset * stride_kct, stride_kch,
                  cos, sin, K_HEADS, KH_PAD, HALF, HALF_PAD)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + offset * stride_vct + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  *, kv_out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of rope_write_kv_ref (kv_out contiguous); returns a new contiguous rotated q. cos/sin are
    fp32 cos/sin of the same fp32 angles as the reference, so results agree to the last bit up to a 1-2 ulp
    difference of cos/sin."""
    T, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert kv_out is None or (kv_out.shape == (2, *k.shape) and kv_out.is_contiguous())
    if T:
        half = head_dim // 2
        _rope_write_kv_kernel[(T,)](
            q, k, v, q_out, q_out if kv_out is None else kv_out, k_cache, v_cache, positions, inv_freq.float(),
            slot_mapping, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *k_cache.stride()[:3], *v_cache.stride()[:3],
            Q_HEADS=q_heads, K_HEADS=k_heads, QH_PAD=triton.next_power_of_2(q_heads),
            KH_PAD=triton.next_power_of_2(k_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
            BLOCK_SIZE=k_cache.shape[1], WRITE_KV_OUT=kv_out is not None,
            num_warps=4 if q_heads * head_dim >= 1024 else 1, **pdl.launch_kwargs(q.device))
    return q_out
