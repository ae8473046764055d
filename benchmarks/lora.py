"""Cost of serving LoRA adapters: Falcon-H1-7B (random weights, published shapes) decode tok/s at 1 and 32
sequences with LoRA off, with LoRA on but only base rows, with one rank-16 adapter on every row, and with
8 different rank-16 adapters mixed in the batch (target: mixed 8 at 32 sequences within 15 % of LoRA off).
Adapters target every projection (Mamba in_proj/out_proj, q/k/v/o, gate/up/down) and are written as PEFT
files with random weights (the work per token is the same as a trained one's).

    python -m benchmarks.lora --out lora.md      # on the GPU
    python -m benchmarks.lora --tiny             # a quick run on the CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.offline import SHAPES, bench_decode
from benchmarks.report import emit
from engine.config import EngineArgs, parse_model_config
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.tokenizer import byte_level_tokenizer_files

TINY = dict(SHAPES["falcon-h1-0.5b"], vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8,
            mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=32, max_position_embeddings=4096,
            torch_dtype="float32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj"]


def write_random_adapter(directory: Path, model_config: dict, rank: int, seed: int,
                         dtype: torch.dtype = torch.bfloat16) -> Path:
    """A PEFT adapter (adapter_config.json + adapter_model.safetensors) on every projection of a Falcon-H1."""
    _, cfg = parse_model_config(model_config)
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    in_proj = 2 * cfg.mamba_d_ssm + 2 * cfg.mamba_n_groups * cfg.mamba_d_state + cfg.mamba_n_heads
    shapes = {"mamba.in_proj": (d, in_proj), "mamba.out_proj": (cfg.mamba_d_ssm, d), "self_attn.q_proj": (d, q),
              "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv), "self_attn.o_proj": (q, d),
              "feed_forward.gate_proj": (d, cfg.intermediate_size), "feed_forward.up_proj": (d, cfg.intermediate_size),
              "feed_forward.down_proj": (cfg.intermediate_size, d)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for module, (k, n) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, k, generator=gen) / k ** 0.5).to(dtype)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(n, rank, generator=gen) * 0.01).to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS, "bias": "none"}))
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (a smoke test)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name, shape = ("tiny", TINY) if args.tiny else ("falcon-h1-7b", SHAPES["falcon-h1-7b"])
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    lines = [f"{name} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}, rank {args.rank}, "
             f"adapters on every projection, 128-token prompts, {args.steps} decode steps timed",
             "", "| model | setup | sequences | decode | vs LoRA off |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        model_dir = Path(root) / name
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(shape))
        byte_level_tokenizer_files(model_dir)
        adapters = [LoRARequest(f"adapter-{i}", i + 1, str(write_random_adapter(
            Path(root) / f"adapter-{i}", shape, args.rank, seed=i, dtype=getattr(torch, dtype))))
            for i in range(args.num_adapters)]
        common = dict(model=str(model_dir), device=device, dtype=dtype, load_format="dummy", max_model_len=1024,
                      max_num_seqs=max(args.batch_sizes), gpu_memory_utilization=0.9)
        base_tok_s: dict[int, float] = {}
        for lora_on in (False, True):
            engine = LLMEngine(EngineArgs(**common, enable_lora=lora_on, max_loras=args.num_adapters,
                                          max_lora_rank=args.rank))
            bench_decode(engine, min(args.batch_sizes), 128, 2)  # compile / warm up first
            setups = [("LoRA off", lambda n: [None] * n)] if not lora_on else [
                ("LoRA on, base rows only", lambda n: [None] * n),
                ("one adapter on every row", lambda n: [adapters[0]] * n),
                (f"{args.num_adapters} adapters mixed", lambda n: [adapters[i % len(adapters)] for i in range(n)])]
            for label, loras in setups:
                for n in args.batch_sizes:
                    if label.endswith("mixed") and n < len(adapters):
                        continue  # fewer rows than adapters: not a mix of all of them
                    tok_s = bench_decode(engine, n, 128, args.steps, loras(n))[0]
                    base_tok_s.setdefault(n, tok_s)
                    lines.append(f"| {name} | {label} | {n} | {tok_s:,.0f} tok/s | {tok_s / base_tok_s[n]:.0%} |")
                    print(lines[-1], flush=True)
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
    emit(lines, args.out)


if __name__ == "__main__":
    main()
