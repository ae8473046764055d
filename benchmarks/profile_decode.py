"""Where a decode step's time goes: whole engine step vs CUDA-graph replay vs kernels inside it.

    python -m benchmarks.profile_decode --model falcon-h1-7b --batch 1 [--weights gptq-int4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.quant import VARIANTS, model_dir
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="falcon-h1-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--weights", default="bf16", choices=list(VARIANTS), help="weight format (dummy weights)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=str(model_dir(args.model, args.weights, Path(root))), device="cuda",
                                      dtype="bfloat16", load_format="dummy", max_model_len=4096,
                                      max_num_seqs=max(args.batch, 8),
                                      quantization="fp8" if args.weights == "fp8" else None))
    params = SamplingParams(max_tokens=10 * args.steps, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), list(range(5, 133)), params)
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3

    graphs = engine.runner.graphs
    bucket = next(b for b in graphs.buckets if b >= args.batch)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(args.steps):
        graphs.graphs[bucket].replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = begin.elapsed_time(end) / args.steps
    print(f"{args.model} {args.weights} batch {args.batch}: engine step {step_ms:.2f} ms, "
          f"graph replay {replay_ms:.2f} ms, host/sampling overhead {step_ms - replay_ms:.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graphs.graphs[bucket].replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
