"""GPU benchmark of the fused decode kernels against the unfused ops they replace, as the decode graph runs them:
one CUDA graph per variant holding every layer of the model (each layer its own state pools, so the states
come from HBM as in the server), timed by replay; reported per layer.

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
from kernels.norm import add_rms_norm, split_rms_norm
from kernels.selective_scan import selective_scan_update, selective_scan_update_bcdt_norm

DEV, DTYPE = "cuda", torch.bfloat16
H1 = {"falcon-h1-0.5b": dict(d=1024, layers=36), "falcon-h1-7b": dict(d=3072, layers=44)}
MAMBA1_7B = dict(CH=8192, N=16, R=256, layers=64)


def graph_us(step: Callable[[], object]) -> float:
    """Mean microseconds of one replay of a graph holding step()."""
    return graph_replay_seconds(step, reps=20) * 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


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
        cases = [(f"{m} residual", residual_rows, (m, batch)) for m in H1]
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
