"""Offline GPU benchmark on random weights with the published shapes (the work per token is the same).

For each model: decode tok/s at 1, 32 and 256 concurrent sequences (128-token prompts; --decode-contexts
adds longer ones, where the attention's KV reads grow), prefill time
of 4,096- and 32,768-token prompts, and how many 4k-context sequences fit, each next to its roofline:
decode moves weights + state + KV bytes per step at the HBM bandwidth; prefill does FLOPs at the bf16
matmul rate. Both ceilings are measured first, in the same run (benchmarks/ceilings.py).

    python -m benchmarks.offline --models falcon-h1-7b falcon-mamba-7b --out results.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ceilings import Ceilings, measure_ceilings
from benchmarks.report import emit
from engine.config import EngineArgs, FalconH1Config, parse_model_config
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import byte_level_tokenizer_files

_H1_COMMON = dict(architectures=["FalconH1ForCausalLM"], mamba_d_conv=4, rope_theta=1e11, mamba_rms_norm=True,
                  mamba_norm_before_gate=False, torch_dtype="bfloat16", max_position_embeddings=262144)
SHAPES = {
    "falcon-h1-0.5b": dict(_H1_COMMON, vocab_size=32784, hidden_size=1024, intermediate_size=2048,
                           num_hidden_layers=36, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                           mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
                           mamba_chunk_size=128, max_position_embeddings=16384),
    "falcon-h1-7b": dict(_H1_COMMON, vocab_size=130049, hidden_size=3072, intermediate_size=12288,
                         num_hidden_layers=44, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128, mamba_n_groups=1, mamba_d_state=256,
                         mamba_chunk_size=256),
    "falcon-h1-34b": dict(_H1_COMMON, vocab_size=261120, hidden_size=5120, intermediate_size=21504,
                          num_hidden_layers=72, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                          mamba_d_ssm=4096, mamba_n_heads=32, mamba_d_head=128, mamba_n_groups=2, mamba_d_state=256,
                          mamba_chunk_size=128),
    "falcon-mamba-7b": dict(architectures=["FalconMambaForCausalLM"], vocab_size=65024, hidden_size=4096,
                            intermediate_size=8192, num_hidden_layers=64, state_size=16, conv_kernel=4,
                            time_step_rank=256, tie_word_embeddings=False, torch_dtype="bfloat16"),
}


def model_dir(name: str, root: Path, shape: dict | None = None) -> Path:
    """A checkpoint directory without weights (for load_format dummy): SHAPES[name]'s config, or `shape`."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(shape or SHAPES[name]))
    byte_level_tokenizer_files(directory)
    return directory


def decode_bytes(engine: LLMEngine, n: int, context: int) -> float:
    """Bytes one decode step must move: every weight but the embedding table once, each sequence's
    state read and written, its KV read and the new K/V written."""
    runner = engine.runner
    tensors = [*runner.model.named_parameters(), *runner.model.named_buffers()]  # quantized layers: buffers
    weights = sum(t.numel() * t.element_size() for name, t in tensors if "embed" not in name)
    state = sum(c.conv_state[0].nbytes + c.ssm_state[0].nbytes for c in runner.caches)
    kv_per_token = sum(c.k_cache[0, 0].nbytes * 2 for c in runner.caches if c.k_cache is not None)
    return weights + n * (2 * state + (context + 1) * kv_per_token)


def prefill_flops(cfg, tokens: int) -> float:
    """Matmul FLOPs (2 per weight per token) plus causal attention and the SSD scan's chunk products."""
    matmul = 0
    if isinstance(cfg, FalconH1Config):
        d, ssm, H, P, G, N, Q = (cfg.hidden_size, cfg.mamba_d_ssm, cfg.mamba_n_heads, cfg.mamba_d_head,
                                 cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_chunk_size)
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        per_layer = (d * (2 * ssm + 2 * G * N + H) + ssm * d + d * (q_out + 2 * kv_out) + q_out * d
                     + 3 * d * cfg.intermediate_size)
        matmul = 2 * tokens * (cfg.num_hidden_layers * per_layer + d * cfg.vocab_size / tokens)
        attention = cfg.num_hidden_layers * 2 * 2 * q_out * tokens * tokens / 2
        ssd = cfg.num_hidden_layers * 2 * tokens * (Q * G * N + Q * H * P + 2 * H * P * N)
        return matmul + attention + ssd
    d, di, N, R = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
    per_layer = d * 2 * di + di * (R + 2 * N) + R * di + di * d
    scan = 6 * di * N  # per token and layer: decay, input and output products
    return 2 * tokens * cfg.num_hidden_layers * per_layer + tokens * cfg.num_hidden_layers * scan


def sync() -> None:
    """Waits for the GPU (nothing to wait for on the CPU, where benchmarks only smoke-test)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_until(engine: LLMEngine, done) -> None:
    while not done():
        engine.step()


def bench_decode(engine: LLMEngine, n: int, prompt_len: int = 128, steps: int = 64,
                 loras: list | None = None) -> tuple[float, float]:
    """Steady-state decode tok/s of n sequences, and the scheduler's share of the step time.
    loras: sequence i's LoRARequest (or None), when the engine serves adapters."""
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(n)
    for i in range(n):
        engine.add_request(f"d{n}-{i}", torch.randint(5, 250, (prompt_len,), generator=gen).tolist(), params,
                           **({"lora_request": loras[i]} if loras else {}))
    seqs = [engine.sequences[f"d{n}-{i}"][0] for i in range(n)]
    run_until(engine, lambda: all(s.num_output_tokens >= 1 for s in seqs))
    schedule, sched_time = engine.scheduler.schedule, [0.0]

    def timed_schedule():
        t = time.perf_counter()
        out = schedule()
        sched_time[0] += time.perf_counter() - t
        return out

    engine.scheduler.schedule = timed_schedule
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    engine.scheduler.schedule = schedule
    for i in range(n):
        engine.abort(f"d{n}-{i}")
    return n * steps / elapsed, sched_time[0] / elapsed


def bench_prefill(engine: LLMEngine, tokens: int) -> float:
    ids = torch.randint(5, 250, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    sync()
    start = time.perf_counter()
    engine.add_request(f"p{tokens}", ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    run_until(engine, lambda: not engine.has_unfinished())
    sync()
    return time.perf_counter() - start


def max_concurrent(engine: LLMEngine, context: int) -> int:
    """Sequences of `context` tokens the planned KV pool and state slots hold at once."""
    runner = engine.runner
    if not runner.block_size:
        return runner.num_slots
    return min(runner.num_slots, runner.num_blocks // -(-context // runner.block_size))


def bench_model(name: str, root: Path, ceilings: Ceilings, batch_sizes: list[int], prefill_lens: list[int],
                max_num_seqs: int, ssm_state_dtype: str = "float32", decode_contexts: tuple[int, ...] = (128,)
                ) -> list:
    """decode_contexts: prompt lengths decode is measured after (each with every batch size)."""
    _, cfg = parse_model_config(SHAPES[name])
    prefill_lens = [t for t in prefill_lens if t + 64 <= cfg.max_position_embeddings]
    args = EngineArgs(model=str(model_dir(name, root)), device="cuda", dtype="bfloat16", load_format="dummy",
                      max_model_len=max(prefill_lens) + 64, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=8192, gpu_memory_utilization=0.92, ssm_state_dtype=ssm_state_dtype)
    start = time.perf_counter()
    engine = LLMEngine(args)
    rows = [(name, "start-up (load + plan + graph capture)", f"{time.perf_counter() - start:.1f} s", "", "")]
    bench_decode(engine, min(batch_sizes), steps=4)  # compile kernels before timing
    for tokens in [1024, *prefill_lens]:  # a length's first prefill may compile kernel variants of its own
        bench_prefill(engine, tokens)
    for context in decode_contexts:
        for n in batch_sizes:
            if n > max_num_seqs or n > max_concurrent(engine, context + 72) or context + 72 > args.max_model_len:
                continue
            tok_s, sched_share = bench_decode(engine, n, prompt_len=context)  # 64 steps after 8 or fewer
            roof = n / (decode_bytes(engine, n, context + 32) / ceilings.hbm_bytes_per_s)
            case = f"decode, {n} seq" + ("" if context == 128 else f", {context:,}-token prompts")
            rows.append((name, case, f"{tok_s:,.0f} tok/s", f"{roof:,.0f} tok/s",
                         f"{tok_s / roof:.0%} (scheduler {sched_share:.0%} of step time)"))
    for tokens in prefill_lens:
        seconds = bench_prefill(engine, tokens)
        roof = prefill_flops(cfg, tokens) / ceilings.bf16_flops
        rows.append((name, f"prefill {tokens:,} tokens", f"{seconds * 1e3:,.0f} ms", f"{roof * 1e3:,.0f} ms",
                     f"{roof / seconds:.0%}"))
    rows.append((name, "max concurrent seqs at 4k context", str(max_concurrent(engine, 4096)),
                 f"{engine.runner.num_slots} slots, {engine.runner.num_blocks} KV blocks", ""))
    del engine
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--ssm-state-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[128],
                        help="prompt lengths decode is measured after (those that fit max_model_len and the pool)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ceilings = measure_ceilings()
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"SSM state {args.ssm_state_dtype}; {ceilings.describe()}",
             "", "| model | measurement | result | roofline | achieved |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            try:
                rows = bench_model(name, Path(root), ceilings, args.batch_sizes, args.prefill_lens,
                                   args.max_num_seqs, args.ssm_state_dtype, tuple(args.decode_contexts))
            except (torch.cuda.OutOfMemoryError, ValueError) as e:
                rows = [(name, "skipped", f"{type(e).__name__}: {str(e)[:200]}", "", "")]
            for row in rows:
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
