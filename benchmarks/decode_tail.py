"""GPU benchmark of the fused decode kernels against the unfused ops they replace, as the decode graph runs them:
one CUDA graph per variant holding every layer of the model (each layer its own state pools, so the states
come from HBM as in the server), timed by replay; reported per layer.

- Mamba2 (Falcon-H1-0.5B / 7B): conv update + state update + gated norm (3 kernels) against
  kernels/mamba2_decode.py (2 kernels), at the state update's rows-per-program choice and at others.
- Falcon-H1's residual: `mamba + attn` then add_rms_norm (2 kernels) against add_rms_norm with two deltas (1).
- FalconMamba-7B: split_rms_norm, dt matmul, state update against dt matmul, state update with the norms in it.

Each variant's outputs are checked against the unfused ops' in the same run (asserts).

    python -m benchmarks.decode_tail [--batch-sizes 1 32 256] [--out decode_tail.md]
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.ceilings import graph_replay_seconds
from kernels.conv1d import causal_conv1d_update
from kernels.mamba2_decode import mamba2_decode_step
from kernels.norm import add_rms_norm, gated_rms_norm, split_rms_norm
from kernels.selective_scan import selective_scan_update, selective_scan_update_bcdt_norm
from kernels.ssm_state_update import block_p_for, ssm_state_update

DEV, DTYPE = "cuda", torch.bfloat16
H1 = {"falcon-h1-0.5b": dict(H=24, P=64, G=1, N=128, d=1024, layers=36),
      "falcon-h1-7b": dict(H=24, P=128, G=1, N=256, d=3072, layers=44)}
MAMBA1_7B = dict(CH=8192, N=16, R=256, layers=64)


def graph_us(step: Callable[[], object]) -> float:
    """Mean microseconds of one replay of a graph holding step()."""
    return graph_replay_seconds(step, reps=20) * 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def mamba2_rows(model: str, batch: int) -> list[tuple[str, float]]:
    c = H1[model]
    H, P, G, N, L = c["H"], c["P"], c["G"], c["N"], c["layers"]
    d_ssm, GN = H * P, G * N
    conv_dim = d_ssm + 2 * GN
    zxbcdt = [torch.randn(batch, d_ssm + conv_dim + H, device=DEV, dtype=DTYPE) for _ in range(L)]
    conv_w = torch.randn(conv_dim, 4, device=DEV, dtype=DTYPE) * 0.5
    conv_b = torch.randn(conv_dim, device=DEV, dtype=DTYPE)
    A, D, dt_bias = -torch.rand(H, device=DEV) - 0.1, torch.randn(H, device=DEV), torch.randn(H, device=DEV) - 1
    norm_w = torch.rand(d_ssm, device=DEV, dtype=DTYPE) + 0.5
    conv = [torch.randn(batch, conv_dim, 3, device=DEV, dtype=DTYPE) for _ in range(L)]
    ssm = [torch.randn(batch, H, P, N, device=DEV) for _ in range(L)]
    slots = torch.arange(batch, device=DEV, dtype=torch.int32)
    limit = (0.0, float("inf"))

    def unfused(i: int) -> torch.Tensor:
        z, xBC, dt = zxbcdt[i].split([d_ssm, conv_dim, H], dim=-1)
        xBC = causal_conv1d_update(xBC, conv_w, conv_b, conv[i], slots)
        x, B, C = xBC.split([d_ssm, GN, GN], dim=-1)
        y = ssm_state_update(x.reshape(batch, H, P), dt, A, B.reshape(batch, G, N), C.reshape(batch, G, N), D,
                             dt_bias, limit, ssm[i], slots)
        return gated_rms_norm(y.reshape(batch, d_ssm), z, norm_w, 1e-5, G, False)

    def fused(i: int, block_p: int | None) -> torch.Tensor:
        z, xBC, dt = zxbcdt[i].split([d_ssm, conv_dim, H], dim=-1)
        return mamba2_decode_step(z, xBC, dt, conv_w, conv_b, A, D, dt_bias, limit, norm_w, 1e-5, G, False,
                                  conv[i], ssm[i], slots, block_p=block_p)

    saved = [t.clone() for t in conv + ssm]
    ref = unfused(0)
    conv[0].copy_(saved[0]), ssm[0].copy_(saved[L])
    default_p = block_p_for(batch, H, P, N)
    variants = [None] + [p for p in (2, 4, 8, 16, 32) if p != default_p]
    for p in variants:
        out = fused(0, p)
        assert rel_err(out, ref) < 2e-2, (model, batch, p, rel_err(out, ref))
        conv[0].copy_(saved[0]), ssm[0].copy_(saved[L])
    rows = [("conv + state update + gated norm (3 kernels)", graph_us(lambda: [unfused(i) for i in range(L)]) / L)]
    for p in variants:
        name = f"mamba2_decode_step, BLOCK_P {p or default_p}" + (" (default)" if p is None else "")
        rows.append((name, graph_us(lambda p=p: [fused(i, p) for i in range(L)]) / L))
    return rows


def residual_rows(model: str, batch: int) -> list[tuple[str, float]]:
    d, L = H1[model]["d"], H1[model]["layers"]
    deltas = [torch.randn(batch, 2 * d, device=DEV, dtype=DTYPE).chunk(2, dim=-1) for _ in range(L)]
    residual = torch.randn(batch, d, device=DEV, dtype=DTYPE)
    w = torch.rand(d, device=DEV, dtype=DTYPE) + 0.5
    a, b = deltas[0]
    assert torch.equal(add_rms_norm(a, residual, w, 1e-5, b)[1], add_rms_norm(a + b, residual, w, 1e-5)[1])
    return [("mamba + attn, add_rms_norm (2 kernels)",
             graph_us(lambda: [add_rms_norm(a + b, residual, w, 1e-5) for a, b in deltas]) / L),
            ("add_rms_norm of two deltas (1 kernel)",
             graph_us(lambda: [add_rms_norm(a, residual, w, 1e-5, b) for a, b in deltas]) / L)]


def mamba1_rows(batch: int) -> list[tuple[str, float]]:
    CH, N, R, L = MAMBA1_7B["CH"], MAMBA1_7B["N"], MAMBA1_7B["R"], MAMBA1_7B["layers"]
    xz = [torch.randn(batch, 2 * CH, device=DEV, dtype=DTYPE).chunk(2, dim=-1) for _ in range(L)]
    dlBC = [torch.randn(batch, R + 2 * N, device=DEV, dtype=DTYPE) * 3 for _ in range(L)]
    w_dt = torch.randn(CH, R, device=DEV, dtype=DTYPE) / R**0.5
    A, D, dt_bias = -torch.rand(CH, N, device=DEV) - 0.05, torch.randn(CH, device=DEV), torch.randn(CH, device=DEV)
    ssm = [torch.randn(batch, CH, N, device=DEV) for _ in range(L)]
    slots = torch.arange(batch, device=DEV, dtype=torch.int32)

    def unfused(i: int) -> torch.Tensor:
        dl, B, C = split_rms_norm(dlBC[i], [R, N, N], 1e-6).split([R, N, N], dim=-1)
        return selective_scan_update(xz[i][0], dl @ w_dt.t(), A, B, C, D, dt_bias, xz[i][1], ssm[i], slots)

    def fused(i: int) -> torch.Tensor:
        dt = dlBC[i][:, :R] @ w_dt.t()
        return selective_scan_update_bcdt_norm(xz[i][0], dt, dlBC[i], 1e-6, A, D, dt_bias, xz[i][1], ssm[i], slots)

    saved = ssm[0].clone()
    ref = unfused(0)
    ssm[0].copy_(saved)
    assert rel_err(fused(0), ref) < 2e-2
    return [("split_rms_norm, dt matmul, state update (3 kernels)",
             graph_us(lambda: [unfused(i) for i in range(L)]) / L),
            ("dt matmul, state update with the norms (2 kernels)", graph_us(lambda: [fused(i) for i in range(L)]) / L)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"# decode_tail, {torch.cuda.get_device_name()}, {datetime.date.today()}", "",
             "| case | batch | variant | us a layer |", "|---|---|---|---|"]
    for batch in args.batch_sizes:
        cases = [(f"{m} Mamba2", mamba2_rows, (m, batch)) for m in H1]
        cases += [(f"{m} residual", residual_rows, (m, batch)) for m in H1]
        cases.append(("falcon-mamba-7b SSM", mamba1_rows, (batch,)))
        for case, rows, case_args in cases:
            for name, us in rows(*case_args):
                lines.append(f"| {case} | {batch} | {name} | {us:.2f} |")
                print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
