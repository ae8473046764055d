"""SiLU(gate) * up computed in the GEMVs' x loads (silu_mul=True: x is the [gate | up] row of the MLP's gate_up
matmul) against silu_mul then the same GEMV, and against the torch references.

The fused loads compute the very values silu_mul's launch writes (kernels/activation.py load_x), so the fused
GEMV must equal silu_mul + GEMV to the bit; the references (F.silu in torch, the fp32 matmul) within the GEMVs'
tolerances. CPU: Triton's interpreter at small shapes, fp32 and bf16 (fp16 for GPTQ, whose scales are fp16),
one split and several, bias or none, act-order; the half2 GEMV is inline PTX, so on the CPU its x gather is
checked. GPU: the Falcon-H1-7B and -0.5B down projections in bf16 through ops.silu_mul_linear for each weight
format, and its fallback for several rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import ops
from engine.quantization.layers import Linear
from kernels import fp8_linear as fp8
from kernels import quant_linear as ql
from kernels.activation import silu_mul, silu_mul_ref
from kernels.gemv import gemv, gemv_ref
from tests.kernels.test_quant_linear import random_gptq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def gate_up_row(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[M, 2K] = [gate | up], gates spread over SiLU's curved part."""
    return (torch.randn(M, 2 * K, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE, dtype)


def halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_up.chunk(2, dim=-1)


def check(fused, unfused: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Twice (the split-K counters must be back at zero after the first call): equal to silu_mul + GEMV."""
    for _ in range(2):
        out = fused()
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.equal(out, unfused)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("M, N, K, warps, split", [
    (1, 20, 300, 1, 1),   # N below a tile, K not a multiple of BLOCK_K: the up half starts mid-tile
    (1, 72, 1000, 1, 3),  # uneven split
    (2, 40, 256, 1, 2),   # two rows: each row's up follows its own gate
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_silu_mul(M, N, K, warps, split, dtype, bias):
    gen = torch.Generator().manual_seed(N)
    gate_up = gate_up_row(M, K, dtype, seed=K)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(DEVICE, dtype)
    b = torch.randn(N, generator=gen).to(DEVICE, dtype) if bias else None
    cfg = dict(BLOCK_N=8, BLOCK_K=8 * 32 * warps, num_warps=warps, num_stages=1, SPLIT_K=split)
    check(lambda: gemv(gate_up, w, b, config=cfg, silu_mul=True), gemv(silu_mul(*halves(gate_up)), w, b, config=cfg),
          gemv_ref(silu_mul_ref(*halves(gate_up)), w, b), dtype)


@pytest.mark.parametrize("K, N, bits, group_size, act_order, split", [
    (256, 64, 4, 128, False, 1),
    (256, 48, 4, 64, True, 2),   # act-order: gate and up both gathered by perm
    (320, 48, 8, 320, True, 3),  # one group, the last tile partial
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptq_gemv_silu_mul(K, N, bits, group_size, act_order, split, dtype):
    qweight, scales, zeros, perm, bias = random_gptq(K, N, bits, group_size, act_order, dtype, seed=K + N)
    gate_up = gate_up_row(1, K, dtype, seed=N)
    cfg = dict(kind="gemv", BLOCK_N=32, BLOCK_K=64, SPLIT_K=split, num_warps=2, num_stages=1)
    args = (qweight, scales, zeros, perm, bias, bits, group_size)
    x = silu_mul(*halves(gate_up))
    check(lambda: ql.gptq_linear(gate_up, *args, config=cfg, silu_mul=True), ql.gptq_linear(x, *args, config=cfg),
          ql.gptq_linear_ref(silu_mul_ref(*halves(gate_up)), *args), dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_x_half2_silu_mul(bits, act_order, dtype):
    """The half2 GEMV's one gather launch does the SiLU * mul: the same words as gathering silu_mul's output."""
    K = 320
    gate_up = gate_up_row(1, K, dtype, seed=bits)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.int32) if act_order else None
    out = ql.gather_x_half2(gate_up, perm, bits, silu_mul=True)
    assert torch.equal(out, ql.gather_x_half2(silu_mul(*halves(gate_up)), perm, bits))
    ref = ql.gather_x_half2_ref(silu_mul_ref(*halves(gate_up)), perm, bits)
    assert rel_err(out.view(torch.float16), ref.view(torch.float16)) < TOL[dtype]


@pytest.mark.parametrize("M, K, N, config", [
    (1, 300, 72, dict(kind="gemv", BLOCK_N=16, BLOCK_K=64, VEC=fp8.GEMV_VEC, SPLIT_K=3, num_warps=1, num_stages=1)),
    (1, 256, 40, dict(kind="gemv", BLOCK_N=8, BLOCK_K=256, VEC=fp8.GEMV_VEC, SPLIT_K=1, num_warps=1, num_stages=1)),
    (1, 256, 48, dict(kind="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=1)),
    (3, 192, 40, dict(kind="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_silu_mul(M, K, N, config, bias):
    """Both weight-only kernels: the GEMV's x loads compute SiLU * mul, the tl.dot kernel runs after silu_mul."""
    gen = torch.Generator().manual_seed(K)
    w, scale = (t.to(DEVICE) for t in fp8.quantize_fp8_weight(torch.randn(N, K, generator=gen) * 0.05))
    b = torch.randn(N, generator=gen).to(DEVICE) if bias else None
    gate_up = gate_up_row(M, K, torch.float32, seed=N)
    x = silu_mul(*halves(gate_up))
    check(lambda: fp8.fp8_weight_only_linear(gate_up, w, scale, b, config=config, silu_mul=True),
          fp8.fp8_weight_only_linear(x, w, scale, b, config=config),
          fp8.fp8_linear_ref(silu_mul_ref(*halves(gate_up)), w, scale, b), torch.float32)


def test_silu_mul_linear_falls_back_to_silu_mul_then_the_layer():
    """Off CUDA (and for any layer without a fused GEMV) the op is silu_mul, then the layer itself."""
    layer = nn.Linear(24, 8).to(DEVICE)
    gate_up = gate_up_row(3, 24, torch.float32, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(ops.silu_mul_linear(gate_up, layer), layer(silu_mul_ref(*halves(gate_up))))


# ----------------------------------------------------------------------------------------------------------------
# GPU: the down projections (K = intermediate, N = hidden) of Falcon-H1-7B, 12288 -> 3072 (above
# ops.FUSED_SILU_MUL_MAX_WEIGHTS: only GPTQ fuses), and of Falcon-H1-0.5B, 2048 -> 1024 (every format fuses), in
# bf16 through the op the model calls.
# ----------------------------------------------------------------------------------------------------------------

DOWN_SHAPES = {"7b": (12288, 3072), "0.5b": (2048, 1024)}


class GPTQLayer(nn.Module):
    """What ops.silu_mul_linear reads of engine/quantization's GPTQLinear, and its forward."""

    method = "gptq"
    separate_parts = None

    def __init__(self, K: int, N: int, bits: int, act_order: bool):
        super().__init__()
        self.qweight, self.scales, self.zeros, self.perm, self.bias = random_gptq(K, N, bits, 128, act_order,
                                                                                  torch.bfloat16)
        self.bits, self.group_size, self.out_features = bits, 128, N

    def args(self) -> tuple:
        return (self.qweight, self.scales, self.zeros, self.perm, self.bias, self.bits, self.group_size,
                self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ql.gptq_linear(x, *self.args())

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return ql.gptq_linear_ref(x, *self.args())


class FP8Layer(nn.Module):
    """The same for engine/quantization's FP8Linear."""

    method = "fp8"

    def __init__(self, K: int, N: int):
        super().__init__()
        self.weight, self.weight_scale = fp8.quantize_fp8_weight(torch.randn(N, K, device=DEVICE) * 0.02)
        self.bias = torch.randn(N, device=DEVICE).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8.fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return fp8.fp8_linear_ref(x, self.weight, self.weight_scale, self.bias)


class BF16Layer(Linear):
    """The model's 16-bit projection (its forward: ops.linear, the GEMV at one row)."""

    def __init__(self, K: int, N: int):
        super().__init__(K, N, bias=True, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return gemv_ref(x, self.weight, self.bias)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", list(DOWN_SHAPES))
@pytest.mark.parametrize("make", [BF16Layer, lambda K, N: GPTQLayer(K, N, 4, True),
                                  lambda K, N: GPTQLayer(K, N, 8, False), FP8Layer],
                         ids=["bf16", "gptq4-act-order", "gptq8", "fp8"])
@torch.no_grad()
def test_silu_mul_linear_down_gpu(shape, make):
    """One row: equal to silu_mul + the layer to the bit, fused or not (the half2 GEMV: its gather does the
    SiLU * mul), within bf16 tolerance of the references. 4 rows: silu_mul, then the layer (cuBLAS, planes,
    tl.dot)."""
    K, N = DOWN_SHAPES[shape]
    layer = make(K, N)
    for rows in (1, 4):
        gate_up = gate_up_row(rows, K, torch.bfloat16, seed=rows)
        out = ops.silu_mul_linear(gate_up, layer)
        assert torch.equal(out, layer(silu_mul(*halves(gate_up))))
        assert rel_err(out, layer.reference(silu_mul_ref(*halves(gate_up)))) < TOL[torch.bfloat16]
