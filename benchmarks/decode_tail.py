"""GPU benchmark of the fused decode kernels against the unfused ops they replace, as the decode graph runs them:
one CUDA graph per variant holding every layer of the model (each layer its own state pools, so the states
come from HBM as in the server), timed by replay; reported per layer.

- Falcon-H1's residual: `mamba + attn` then add_rms_norm (2 kernels) against add_rms_norm with two deltas (1).
- FalconMamba-7B: split_rms_norm, dt matmul, state update against dt matmul, state update with the norms in it.
- Falcon-H1-0.5B's and -7B's MLP tail at one row: silu_mul then the down projection's GEMV (2 launches; GPTQ's
  half2 GEMV 3 with its gather) against the GEMV with SiLU*mul in its x loads, for bf16, GPTQ Int4 and FP8 weights.
- Falcon-H1-7B attention decode (split decode + the reduce kernel), the least tokens a split holds swept, at
  (context, max_seq_len) pairs: a graph is sized for max_model_len, so the split count follows max_seq_len and
  the active splits the context.
- --engine: the Falcon-H1-7B engine's batch-1 decode graph (dummy weights, every layer, 128-token prompt) against
  the same graph captured with both changes undone (ops.silu_mul_linear as silu_mul + the layer, attention
  splits of one K/V tile), timed alternately, logits compared.

Each variant's outputs are checked against the unfused ops' in the same run (asserts).

    python -m benchmarks.decode_tail [--batch-sizes 1 32 256] [--cases residual mamba1 mlp attention] [--engine]
        [--out decode_tail.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.ceilings import graph_replay_seconds, replay_seconds
from engine import ops
from kernels import attention
from kernels import fp8_linear as fp8
from kernels import quant_linear as ql
from kernels.activation import silu_mul
from kernels.attention import decode
from kernels.gemv import gemv, gemv_config
from kernels.norm import add_rms_norm, split_rms_norm
from kernels.selective_scan import selective_scan_update, selective_scan_update_bcdt_norm

DEV, DTYPE = "cuda", torch.bfloat16
H1 = {"falcon-h1-0.5b": dict(d=1024, layers=36), "falcon-h1-7b": dict(d=3072, layers=44)}
MAMBA1_7B = dict(CH=8192, N=16, R=256, layers=64)
MLP = {"falcon-h1-0.5b": dict(I=2048, d=1024, layers=36), "falcon-h1-7b": dict(I=12288, d=3072, layers=44)}
H1_7B_ATTN = dict(q_heads=12, kv_heads=2, head_dim=128, block_size=16, layers=44)
ATTENTION_CASES = [(160, 4160), (1024, 4160), (4096, 4160), (160, 32768), (2048, 32768), (8192, 32768),
                   (32768, 32768)]  # (context, max_seq_len)
ATTENTION_CASES_BATCHED = [(160, 4160), (1024, 4160), (4096, 4160)]
ATTENTION_MIN_PARTITIONS = (64, 128, 256, 512)


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


def down_layers(fmt: str, L: int, K: int, N: int) -> list[Callable[[torch.Tensor, bool], torch.Tensor]]:
    """L down projections [K -> N] in weight format fmt, each its own weights: f(x, silu_mul) -> y."""
    g = torch.Generator(device=DEV).manual_seed(0)
    layers = []
    for _ in range(L):
        if fmt == "bf16":
            w = (torch.randn(N, K, device=DEV, generator=g) * 0.02).to(DTYPE)
            layers.append(lambda x, fused, block_n=4, w=w: gemv(x, w, silu_mul=fused,
                                                                 config=gemv_config(N, K, w.device, block_n)))
        elif fmt == "gptq-int4":
            qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), device=DEV, dtype=torch.int32, generator=g)
            scales = (torch.rand(K // 128, N, device=DEV, generator=g) * 0.002).half()
            zeros = torch.full((K // 128, N), 8, device=DEV, dtype=torch.int16)
            layers.append(lambda x, fused, q=(qweight, scales, zeros): ql.gptq_linear(x, *q, None, None, 4, 128,
                                                                                      silu_mul=fused))
        else:
            w, scale = fp8.quantize_fp8_weight(torch.randn(N, K, device=DEV, generator=g) * 0.02)
            layers.append(lambda x, fused, w=w, scale=scale: fp8.fp8_weight_only_linear(x, w, scale, None,
                                                                                          silu_mul=fused))
    return layers


def mlp_rows(model: str, fmt: str) -> list[tuple[str, float]]:
    """The model's SiLU*mul + down projection at one row (the only row count that fuses)."""
    I, d, L = MLP[model]["I"], MLP[model]["d"], MLP[model]["layers"]
    gate_up = [torch.randn(1, 2 * I, device=DEV, dtype=DTYPE) * 2 for _ in range(L)]
    down = down_layers(fmt, L, I, d)
    assert torch.equal(down[0](gate_up[0], True), down[0](silu_mul(*gate_up[0].chunk(2, dim=-1)), False))
    launches = "3 launches, with the gather" if fmt == "gptq-int4" else "2 launches"
    rows = [(f"{fmt}: silu_mul, down GEMV ({launches})",
             graph_us(lambda: [f(silu_mul(*x.chunk(2, dim=-1)), False) for f, x in zip(down, gate_up)]) / L),
            (f"{fmt}: down GEMV with SiLU*mul in its loads",
             graph_us(lambda: [f(x, True) for f, x in zip(down, gate_up)]) / L)]
    for block_n in (8, 16) if fmt == "bf16" else ():  # fewer programs recomputing each x tile's SiLU
        assert rel_err(down[0](gate_up[0], True, block_n), down[0](gate_up[0], True)) < 1e-2  # the split may differ
        rows.append((f"{fmt}: down GEMV with SiLU*mul in its loads, {block_n} W rows a program",
                     graph_us(lambda bn=block_n: [f(x, True, bn) for f, x in zip(down, gate_up)]) / L))
    return rows


@contextlib.contextmanager
def min_partition(tokens: int) -> Iterator[None]:
    """decode.DECODE_MIN_PARTITION for the launches (and graph captures) inside."""
    saved = decode.DECODE_MIN_PARTITION
    decode.DECODE_MIN_PARTITION = tokens
    try:
        yield
    finally:
        decode.DECODE_MIN_PARTITION = saved


def attention_rows(batch: int, context: int, max_seq_len: int) -> list[tuple[str, float]]:
    """Falcon-H1-7B attention decode of `batch` sequences of `context` tokens, each layer its own KV pages, at
    each of ATTENTION_MIN_PARTITIONS tokens a split at least."""
    Hq, Hkv, D, bs, L = (H1_7B_ATTN[k] for k in ("q_heads", "kv_heads", "head_dim", "block_size", "layers"))
    pages = -(-context // bs)
    seq_lens = torch.full((batch,), context, device=DEV, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, device=DEV, dtype=torch.int32)
    tables = torch.arange(batch * pages, device=DEV, dtype=torch.int32).view(batch, pages)
    layers = [(torch.randn(batch, Hq, D, device=DEV, dtype=DTYPE),
               torch.randn(batch * pages, bs, Hkv, D, device=DEV, dtype=DTYPE),
               torch.randn(batch * pages, bs, Hkv, D, device=DEV, dtype=DTYPE)) for _ in range(L)]

    def step() -> list[torch.Tensor]:
        return [attention.paged_attention(q, k, v, query_start_loc, seq_lens, tables, D**-0.5, batch, 1, max_seq_len)
                for q, k, v in layers]

    ref = attention.paged_attention_ref(*layers[0], query_start_loc, seq_lens, tables, D**-0.5, batch, 1, max_seq_len)
    rows = []
    for tokens in sorted({decode.DECODE_MIN_PARTITION, *ATTENTION_MIN_PARTITIONS}):
        with min_partition(tokens):
            assert rel_err(step()[0], ref) < 1e-2
            splits = decode.decode_splits(batch, Hkv, max_seq_len, torch.device(DEV))
            active = -(-context // max(decode.min_partition(), -(-context // splits)))
            default = " (default)" if tokens == decode.DECODE_MIN_PARTITION else ""
            rows.append((f"context {context}, max_seq_len {max_seq_len}: min partition {tokens}{default} "
                         f"({splits} splits, ~{active} active)", graph_us(step) / L))
    return rows


def silu_mul_then_layer(gate_up: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """ops.silu_mul_linear before the fusion: always silu_mul, then the layer."""
    return layer(ops.silu_mul(*gate_up.chunk(2, dim=-1)))


def engine_rows(reps: int = 50) -> list[tuple[str, float]]:
    """The Falcon-H1-7B engine's batch-1 decode graph against it captured with the old MLP tail and attention
    splits of one K/V tile at least (same static inputs and caches), alternately twice; ms a step, min of the
    rounds."""
    from benchmarks.offline import model_dir
    from benchmarks.pdl import replay_logits, state_tensors
    from engine.config import EngineArgs
    from engine.cuda_graphs import capture_graph
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=str(model_dir("falcon-h1-7b", Path(root))), device="cuda",
                                      dtype="bfloat16", load_format="dummy", max_model_len=4160, max_num_seqs=1,
                                      max_num_batched_tokens=256, num_kv_blocks=300, gpu_memory_utilization=0.4,
                                      enable_prefix_caching=False))
    engine.add_request("0", list(range(5, 133)), SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
    for _ in range(4):  # prefill, then decodes through the bucket-1 graph: its inputs now hold a real row
        engine.step()
    runner = engine.runner
    new = runner.graphs.graphs[1], runner.graphs.logits[1]
    fused_op = ops.silu_mul_linear
    ops.silu_mul_linear = silu_mul_then_layer
    try:
        with min_partition(decode.DECODE_BLOCK_N), torch.inference_mode():
            old = capture_graph(lambda: runner.model.compute_logits(runner.model(runner.graphs.batch(1),
                                                                                  runner.caches)),
                                torch.cuda.graph_pool_handle(), runner.model.tp.size)
    finally:
        ops.silu_mul_linear = fused_op
    rounds = {"old": [], "new": []}
    for _ in range(2):
        rounds["old"].append(replay_seconds(old[0], reps) * 1e3)
        rounds["new"].append(replay_seconds(new[0], reps) * 1e3)
    states = state_tensors(engine)
    with torch.inference_mode():
        saved = [t.clone() for t in states]
    diff = (replay_logits(*new, states, saved) - replay_logits(*old, states, saved)).abs().max().item()
    print(f"engine logits, new vs old graph: max |diff| {diff:.3g}; rounds (ms) {rounds}", flush=True)
    return [("batch-1 decode graph: silu_mul + GEMV, attention splits of one tile (ms a step)", min(rounds["old"])),
            ("batch-1 decode graph: SiLU*mul in the GEMV, attention splits of DECODE_MIN_PARTITION (ms a step)",
             min(rounds["new"]))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--cases", nargs="+", default=["residual", "mamba1", "mlp", "attention"])
    parser.add_argument("--engine", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"# decode_tail, {torch.cuda.get_device_name()}, {datetime.date.today()}", "",
             "| case | batch | variant | us a layer |", "|---|---|---|---|"]
    for batch in args.batch_sizes:
        cases = []
        if "residual" in args.cases:
            cases += [(f"{m} residual", residual_rows, (m, batch)) for m in H1]
        if "mamba1" in args.cases:
            cases.append(("falcon-mamba-7b SSM", mamba1_rows, (batch,)))
        if "mlp" in args.cases and batch == 1:
            cases += [(f"{m} MLP tail", mlp_rows, (m, fmt)) for m in MLP for fmt in ("bf16", "gptq-int4", "fp8")]
        if "attention" in args.cases:
            pairs = ATTENTION_CASES if batch == 1 else ATTENTION_CASES_BATCHED
            cases += [("falcon-h1-7b attention", attention_rows, (batch, *pair)) for pair in pairs]
        for case, rows, case_args in cases:
            for name, us in rows(*case_args):
                lines.append(f"| {case} | {batch} | {name} | {us:.2f} |")
                print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    if args.engine:
        for name, ms in engine_rows():
            lines.append(f"| falcon-h1-7b engine | 1 | {name} | {ms:.3f} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
