"""Triton NeoX RoPE fused with the K/V cache write against rope_ref + write_kv_ref.

Angles are the same fp32 products fp32(position) * inv_freq in both; cos/sin of those angles (up to ~2.6e5 rad at
theta 1e11, where inv_freq[0] = 1) may differ by 1-2 ulp between the kernel and torch, hence the tolerances:
max |out - ref| / max |ref| < 1e-3 in fp32, < 1e-2 in fp16 / bf16 (a flipped last bit after cos is cast to the
activation dtype). CPU: Triton's interpreter in fp32 / fp16 (it truncates fp32 -> bf16, so bf16 runs on the GPU).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}



def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Like the model's buffer: 1 / theta^(2i / head_dim) in fp32."""
    return (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))).to(DEVICE)


def check(T: int, q_heads: int, kv_heads: int, head_dim: int, theta: float, max_pos: int, dtype: torch.dtype,
          seed: int, block_size: int = 16) -> None:
    gen = torch.Generator().manual_seed(seed)
    # q, k and v as views of one fused projection output (row stride wider than the heads)
    qkv = torch.randn(T, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(T, q_heads, head_dim), k.view(T, kv_heads, head_dim), v.view(T, kv_heads, head_dim)
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(DEVICE)
    num_blocks = T // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[::5] = -1  # padding rows write nothing
    slots = slots.to(DEVICE)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    freqs = inv_freq(head_dim, theta)
    before = qkv.clone()
    kv_out = torch.full((2, *k.shape), float("nan"), dtype=dtype, device=DEVICE)
    q_out = rope.rope_write_kv(q, k, v, positions, freqs, k_cache, v_cache, slots, kv_out=kv_out)
    k_out, v_out = kv_out
    q_ref = rope.rope_write_kv_ref(q, k, v, positions, freqs, k_ref, v_ref, slots)
    assert torch.equal(qkv, before), "inputs must be left untouched"
    _, k_rotated = rope.rope_ref(q, k, positions, freqs)
    assert torch.equal(v_out, v), "every row of kv_out, padding included, is written"
    kept = slots >= 0  # attention reads these rows instead of the cache's: they must be the same bits
    assert torch.equal(k_out[kept].to(k_cache.dtype), k_cache.flatten(0, 1)[slots[kept]])
    assert torch.equal(v_cache, v_ref)  # v is copied, untouched slots keep their values
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    assert torch.equal(k_cache.flatten(0, 1)[~written], k_ref.flatten(0, 1)[~written])
    for out, ref in ((q_out, q_ref), (k_cache, k_ref), (k_out, k_rotated)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,theta,max_pos", [(24, 1e4, 512), (64, 1e11, 262144), (16, 1e11, 16)])
def test_rope_write_kv(dtype: torch.dtype, head_dim: int, theta: float, max_pos: int):
    check(19, 6, 2, head_dim, theta, max_pos, dtype, seed=head_dim, block_size=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(8, 2, 64), (12, 2, 128), (20, 4, 128)])
def test_rope_write_kv_gpu(dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int):
    check(4096, q_heads, kv_heads, head_dim, 1e11, 262144, dtype, seed=q_heads)
    check(3, q_heads, kv_heads, head_dim, 1e11, 262144, dtype, seed=1)
