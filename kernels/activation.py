"""SwiGLU's activation: SiLU(gate) * up, one pass instead of two (gate and up are views of one matmul)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl
from kernels.pdl import wait_for_predecessor


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, elementwise, in the inputs' dtype."""
    return F.silu(gate) * up


@triton.jit
def silu_mul_values(gate, up):
    """SiLU(gate) * up in the inputs' dtype, rounded to it between the two products as the two-op reference is."""
    g = gate.to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    return (silu * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def load_x(x_ptrs, mask, K, SILU_MUL: tl.constexpr):
    """A GEMV's activation loads, zero where masked: x itself, or SILU_MUL: SiLU(gate) * up of a [gate | up] row,
    the gate at x_ptrs and up K elements on. The same values silu_mul's launch would write, so a GEMV that loads
    x this way gives the result of silu_mul and then the GEMV, to the bit."""
    if SILU_MUL:
        gate = tl.load(x_ptrs, mask=mask, other=0.0)
        return silu_mul_values(gate, tl.load(x_ptrs + K, mask=mask, other=0.0))
    return tl.load(x_ptrs, mask=mask, other=0.0)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    wait_for_predecessor(USE_PDL)
    g = tl.load(gate_ptr + row * stride_g + offs, mask=mask)
    u = tl.load(up_ptr + row * stride_u + offs, mask=mask)
    tl.store(out_ptr + row * stride_o + offs, silu_mul_values(g, u), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of silu_mul_ref for [rows, cols] inputs with unit column stride (row strides free)."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1
    rows, cols = gate.shape
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    block = min(1024, triton.next_power_of_2(cols))
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(cols, block))](gate, up, out, cols, gate.stride(0), up.stride(0),
                                                          out.stride(0), BLOCK=block, **pdl.launch_kwargs(gate.device))
    return out
