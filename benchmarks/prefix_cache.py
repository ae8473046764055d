"""Prefix-cache benchmark on random weights with Falcon-H1-7B's shapes (GPU), cache on vs off:

1. a 10-turn chat resent whole every turn (~500-token user turns, ~200-token replies): time to first
   token per turn;
2. a shared 2,000-token system prompt with 64 different 200-token suffixes, one after another: the
   share of shareable prompt tokens served from the cache (from the third request on) and TTFT;
3. the same with the prompt layout shifted by 100 tokens (a 2,100-token shared prefix);
4. decode tok/s of 1 and 32 sequences.

    python -m benchmarks.prefix_cache --out prefix_cache.md          # the GPU run
    python -m benchmarks.prefix_cache --tiny                         # a tiny model on CPU, to check it works
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.offline import SHAPES
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import byte_level_tokenizer_files

TINY = dict(architectures=["FalconH1ForCausalLM"], vocab_size=300, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=64,
            mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
            mamba_chunk_size=16, mamba_rms_norm=True, mamba_norm_before_gate=False, torch_dtype="float32",
            max_position_embeddings=4096)


@dataclass
class Workload:
    turns: int = 10
    user_len: int = 500
    reply_len: int = 200
    system_len: int = 2000
    suffix_len: int = 200
    num_suffixes: int = 64
    shift: int = 100
    decode_batches: tuple[int, ...] = (1, 32)


TINY_WORKLOAD = Workload(turns=4, user_len=40, reply_len=16, system_len=160, suffix_len=16, num_suffixes=6, shift=10,
                         decode_batches=(1, 4))


def sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(5, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int) -> tuple[float, list[int], int]:
    """Time to the first token of one request run alone; its output tokens and cached prompt tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    sync(engine)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first, tokens, cached = None, [], 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and first is None:
                sync(engine)
                first = time.perf_counter() - start
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    return first, tokens, cached


def chat(engine: LLMEngine, w: Workload) -> list[tuple[float, int, int]]:
    """(TTFT, prompt tokens, cached tokens) per turn."""
    prompt, rows = [], []
    for turn in range(w.turns):
        prompt = prompt + random_tokens(w.user_len, 1000 + turn)
        seconds, reply, cached = ttft(engine, f"chat{turn}", prompt, w.reply_len)
        rows.append((seconds, len(prompt), cached))
        prompt = prompt + reply
    return rows


def shared_prefix(engine: LLMEngine, w: Workload, prefix_len: int, tag: str) -> list[tuple[float, int]]:
    """(TTFT, cached tokens) of each request: the shared prefix plus its own suffix."""
    prefix = random_tokens(prefix_len, 7)
    return [ttft(engine, f"{tag}{i}", prefix + random_tokens(w.suffix_len, 2000 + i), 8)[::2]
            for i in range(w.num_suffixes)]


def decode_tok_s(engine: LLMEngine, n: int, steps: int = 64) -> float:
    """Steady-state decode tok/s of n sequences with 128-token prompts."""
    for i in range(n):
        engine.add_request(f"d{n}-{i}", random_tokens(128, 3000 + i),
                           SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    seqs = [engine.sequences[f"d{n}-{i}"][0] for i in range(n)]
    while not all(s.num_output_tokens >= 1 for s in seqs):
        engine.step()
    sync(engine)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine)
    elapsed = time.perf_counter() - start
    for i in range(n):
        engine.abort(f"d{n}-{i}")
    return n * steps / elapsed


def run(args: EngineArgs, w: Workload) -> dict:
    engine = LLMEngine(args)
    chat(engine, w)  # a full rehearsal compiles every kernel before anything is timed
    decode_tok_s(engine, max(w.decode_batches), steps=4)
    engine.reset_prefix_cache()
    result = {"chat": chat(engine, w), "shared": shared_prefix(engine, w, w.system_len, "s"),
              "shifted": shared_prefix(engine, w, w.system_len + w.shift, "t"),
              "decode": [decode_tok_s(engine, n) for n in w.decode_batches],
              "checkpoints": engine.runner.num_checkpoints}
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def report(on: dict, off: dict, w: Workload) -> list[str]:
    lines = [f"prefix cache: {on['checkpoints']} state checkpoints", "",
             "| turn | prompt tokens | cached (on) | TTFT off | TTFT on | speed-up |", "|---|---|---|---|---|---|"]
    for turn, ((t_on, n, cached), (t_off, _, _)) in enumerate(zip(on["chat"], off["chat"]), start=1):
        lines.append(f"| {turn} | {n:,} | {cached:,} | {t_off * 1e3:,.1f} ms | {t_on * 1e3:,.1f} ms | "
                     f"{t_off / t_on:.1f}x |")
    lines += ["", "| shared prefix | hit rate (3rd request on) | mean TTFT off | mean TTFT on | speed-up |",
              "|---|---|---|---|---|"]
    for key, prefix_len in (("shared", w.system_len), ("shifted", w.system_len + w.shift)):
        later_on, later_off = on[key][2:], off[key][2:]
        hit_rate = sum(c for _, c in later_on) / (prefix_len * len(later_on))
        mean_on, mean_off = (statistics.mean(t for t, _ in rows) for rows in (later_on, later_off))
        lines.append(f"| {prefix_len:,} tokens + {w.suffix_len} x {w.num_suffixes} | {hit_rate:.0%} | "
                     f"{mean_off * 1e3:,.1f} ms | {mean_on * 1e3:,.1f} ms | {mean_off / mean_on:.1f}x |")
    lines += ["", "| decode | tok/s off | tok/s on | on / off |", "|---|---|---|---|"]
    for n, tok_on, tok_off in zip(w.decode_batches, on["decode"], off["decode"]):
        lines.append(f"| {n} seq | {tok_off:,.0f} | {tok_on:,.0f} | {tok_on / tok_off:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on CPU and a small workload")
    parser.add_argument("--model", default="falcon-h1-7b", choices=[k for k in SHAPES if k.startswith("falcon-h1")])
    parser.add_argument("--prefix-cache-checkpoints", type=int, help="default: the memory plan's")
    parser.add_argument("--out", type=Path)
    cli = parser.parse_args()
    w = TINY_WORKLOAD if cli.tiny else Workload()
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root)
        (directory / "config.json").write_text(json.dumps(TINY if cli.tiny else SHAPES[cli.model]))
        byte_level_tokenizer_files(directory)
        common = dict(model=str(directory), load_format="dummy", max_model_len=8192 if not cli.tiny else 1024,
                      max_num_seqs=max(w.decode_batches), prefix_cache_checkpoints=cli.prefix_cache_checkpoints)
        common |= dict(device="cpu", dtype="float32") if cli.tiny else dict(device="cuda", dtype="bfloat16",
                                                                          gpu_memory_utilization=0.9)
        on = run(EngineArgs(**common), w)
        off = run(EngineArgs(**common, enable_prefix_caching=False), w)
    device = "CPU (tiny model)" if cli.tiny else torch.cuda.get_device_name()
    text = "\n".join([f"{cli.model if not cli.tiny else 'tiny Falcon-H1'} on {device}, torch {torch.__version__}", ""]
                     + report(on, off, w)) + "\n"
    print(text)
    if cli.out:
        cli.out.write_text(text)


if __name__ == "__main__":
    main()
