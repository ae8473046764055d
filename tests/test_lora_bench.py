"""benchmarks/lora.py runs end to end on the CPU (--tiny), so the device run does not fail on a typo; its
random PEFT adapter files load and change the output."""

import torch

from benchmarks import lora as bench
from engine import LLM, LoRARequest, SamplingParams


def test_lora_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "lora.md"
    bench.main(["--tiny", "--batch-sizes", "1", "2", "--num-adapters", "2", "--rank", "4", "--steps", "2",
                "--out", str(out)])
    rows = [line.split(" | ")[1:3] for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert rows == [["LoRA off", "1"], ["LoRA off", "2"], ["LoRA on, base rows only", "1"],
                    ["LoRA on, base rows only", "2"], ["one adapter on every row", "1"],
                    ["one adapter on every row", "2"], ["2 adapters mixed", "2"]]


def test_random_adapter_files_act(h1_dir, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(h1_dir).to_dict()
    adapter = bench.write_random_adapter(tmp_path / "a", config, rank=4, seed=0, dtype=torch.float32)
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=4)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    base = llm.generate([[5, 6, 7]], params)[0].outputs[0]
    tuned = llm.generate([[5, 6, 7]], params, lora_request=LoRARequest("a", 1, str(adapter)))[0].outputs[0]
    assert base.logprobs != tuned.logprobs
