"""The one-page einsum SSD (kernels/ssd_minimal.py) against the token-by-token reference of kernels/ssd_scan.py,
in float32 on the CPU: the chunked form is the same function whatever the chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.ssd_minimal import ssd_chunked
from kernels.ssd_scan import ssd_scan_varlen_ref


@pytest.mark.parametrize("T,chunk", [(37, 8), (32, 8), (5, 16), (1, 4), (40, 40)])
@pytest.mark.parametrize("G", [1, 2])
def test_einsum_ssd_equals_recurrence(T: int, chunk: int, G: int):
    H, P, N = 4, 6, 5
    gen = torch.Generator().manual_seed(T * 10 + chunk + G)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    x, dt_raw, B, C = randn(T, H, P), randn(T, H), randn(T, G, N), randn(T, G, N)
    A, D, dt_bias = -torch.rand(H, generator=gen, dtype=torch.float32) * 2 - 0.1, randn(H), randn(H) - 1
    state = randn(H, P, N)
    states = state[None].clone()
    qsl, slot, init = torch.tensor([0, T]), torch.tensor([0]), torch.tensor([True])
    ref = ssd_scan_varlen_ref(x, dt_raw, A, B, C, D, dt_bias, (0.0, float("inf")), states, qsl, slot, init)
    y, final = ssd_chunked(x, F.softplus(dt_raw + dt_bias), A, B, C, D, state, chunk)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, states[0], rtol=1e-4, atol=1e-4)
