"""End to end on a CUDA device (skipped without one): Triton kernels + CUDA graphs against transformers
and against the eager path; bf16 against fp32 on a Falcon-H1-0.5B-shaped random model."""

import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine.tokenizer import byte_level_tokenizer_files
from tests.tiny_models import reference_greedy

pytestmark = pytest.mark.gpu

# Several engines live in one process here: each takes a small share of the GPU.
SHARE = dict(gpu_memory_utilization=0.2)
PROMPTS = [[5 + (11 * i + 5 * j) % 250 for j in range(3 + 9 * i)] for i in range(6)]


def greedy(max_tokens=16, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_float32_matches_transformers(request, fixture, enforce_eager):
    directory = request.getfixturevalue(fixture)
    llm = LLM(str(directory), device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=24,
              kv_block_size=16, enforce_eager=enforce_eager, **SHARE)
    assert (llm.engine.runner.graphs is None) == enforce_eager
    outputs = llm.generate(PROMPTS, greedy())
    for prompt, out in zip(PROMPTS, outputs):
        assert out.outputs[0].token_ids == reference_greedy(directory, prompt, 16)


def test_graph_replay_equals_eager_with_sampling(h1_dir):
    params = [SamplingParams(max_tokens=20, temperature=0.8, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    graphs = LLM(str(h1_dir), device="cuda", dtype="float32", max_num_seqs=8, **SHARE)
    eager = LLM(str(h1_dir), device="cuda", dtype="float32", max_num_seqs=8, enforce_eager=True, **SHARE)
    for a, b in zip(graphs.generate(PROMPTS, params), eager.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_bfloat16_agrees_with_float32_on_0_5b_shapes(tmp_path):
    from benchmarks.offline import SHAPES

    (tmp_path / "config.json").write_text(json.dumps(SHAPES["falcon-h1-0.5b"]))
    byte_level_tokenizer_files(tmp_path)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(tmp_path), device="cuda", dtype=dtype, load_format="dummy", max_model_len=2048, max_num_seqs=8,
                  **SHARE)
        runs[dtype] = llm.generate(PROMPTS, greedy(32, logprobs=1))
        del llm
        torch.cuda.empty_cache()
    prefixes, diffs = [], []
    for full, half in zip(runs["float32"], runs["bfloat16"]):
        a, b = full.outputs[0], half.outputs[0]
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        prefixes.append(same)
        diffs += [abs(a.logprobs[i][a.token_ids[i]] - b.logprobs[i][b.token_ids[i]]) for i in range(same)]
    print(f"bf16 vs fp32: identical greedy prefix per prompt {prefixes} of 32; max |logprob diff| on the "
          f"shared prefix {max(diffs):.4f}, mean {sum(diffs) / len(diffs):.4f}")
    assert min(prefixes) >= 4 and max(diffs) < 0.1
