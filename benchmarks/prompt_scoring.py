"""GPU benchmark of prompt scoring (what lm-eval's loglikelihood requests cost): prefill throughput of
many prompts without prompt logprobs, with prompt_logprobs=1 (echo + logprobs=1) and with max_tokens=0,
on random weights with the published shapes, and the peak memory above the memory plan's profile.

    python -m benchmarks.prompt_scoring --models falcon-h1-0.5b falcon-h1-7b --prompt-len 1024 --num-prompts 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.offline import SHAPES, model_dir
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, tag: str) -> float:
    """Seconds to run every prompt to the end."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["falcon-h1-0.5b", "falcon-h1-7b"], choices=list(SHAPES))
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            engine = LLMEngine(EngineArgs(model=str(model_dir(name, Path(root))), device="cuda", dtype="bfloat16",
                                          load_format="dummy", max_model_len=args.prompt_len + 16, max_num_seqs=64))
            vocab = engine.model_config.vocab_size
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(5, min(vocab, 250), (args.prompt_len,), generator=g).tolist()
                       for _ in range(args.num_prompts)]
            tokens = args.prompt_len * args.num_prompts
            cases = {"plain (max_tokens=1)": SamplingParams(max_tokens=1, temperature=0),
                     "prompt_logprobs=1, max_tokens=1": SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                     "prompt_logprobs=0, max_tokens=0": SamplingParams(max_tokens=0, prompt_logprobs=0)}
            for label, params in cases.items():  # warm-up: kernels compiled for every batch shape
                run(engine, prompts[:8], params, f"warm-{label}")
            base = None
            for label, params in cases.items():
                torch.cuda.reset_peak_memory_stats()
                seconds = run(engine, prompts, params, label)
                base = base or seconds
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"{name:16s} {label:34s} {tokens / seconds:10.0f} prompt tok/s  "
                      f"{100 * (seconds / base - 1):+6.1f}%  peak {peak:.2f} GiB")
            del engine
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
