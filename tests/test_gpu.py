"""End to end on a CUDA device (skipped without one): Triton kernels + CUDA graphs against transformers
and against the eager path; bf16 against fp32 on a Falcon-H1-0.5B-shaped random model."""

import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine.tokenizer import byte_level_tokenizer_files
from tests.tiny_models import GPU_TEST_MEMORY, reference_greedy

pytestmark = pytest.mark.gpu

# Several engines live in one process here: each takes a small share of the GPU.
SHARE = dict(gpu_memory_utilization=GPU_TEST_MEMORY)
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


def first_token_logprobs(directory, dtype, monkeypatch, torch_ops=False):
    """Top-20 logprobs of the first generated token of each prompt (a teacher-forced comparison: every
    run sees the same prompt, unlike later tokens, which follow each run's own choices)."""
    monkeypatch.setattr("engine.ops._FORCE_TORCH", torch_ops)
    llm = LLM(str(directory), device="cuda", dtype=dtype, load_format="dummy", max_model_len=2048, max_num_seqs=8,
              enforce_eager=torch_ops, **SHARE)
    outs = llm.generate(PROMPTS, greedy(1, logprobs=20))
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].logprobs[0] for o in outs]


def compare(reference, other):
    diffs = [abs(ref[t] - oth[t]) for ref, oth in zip(reference, other) for t in ref.keys() & oth.keys()]
    top1 = sum(max(ref, key=ref.get) == max(oth, key=oth.get) for ref, oth in zip(reference, other))
    return max(diffs), sum(diffs) / len(diffs), top1


def test_bfloat16_agrees_with_float32_on_0_5b_shapes(tmp_path, monkeypatch):
    """bf16 against fp32 on random weights with Falcon-H1-0.5B's shapes; the same comparison with the
    torch reference ops in bf16 is the yardstick for what bf16 itself costs."""
    from benchmarks.offline import SHAPES

    (tmp_path / "config.json").write_text(json.dumps(SHAPES["falcon-h1-0.5b"]))
    byte_level_tokenizer_files(tmp_path)
    fp32 = first_token_logprobs(tmp_path, "float32", monkeypatch)
    kernels = compare(fp32, first_token_logprobs(tmp_path, "bfloat16", monkeypatch))
    torch_ops = compare(fp32, first_token_logprobs(tmp_path, "bfloat16", monkeypatch, torch_ops=True))
    for name, (worst, mean, top1) in (("triton bf16", kernels), ("torch-reference bf16", torch_ops)):
        print(f"{name} vs triton fp32: max |logprob diff| {worst:.4f}, mean {mean:.4f} over the top-20 tokens; "
              f"same top-1 token for {top1}/{len(PROMPTS)} prompts")
    assert kernels[0] < 1.0 and kernels[1] < 2 * torch_ops[1] + 0.01


@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_cuda_prompt_logprobs_match_transformers(request, fixture):
    """Prompt logprobs over prefill chunks on the GPU (graphs on: decodes still replay) equal transformers'."""
    from tests.tiny_models import reference_prompt_logprobs

    directory = request.getfixturevalue(fixture)
    llm = LLM(str(directory), device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=24,
              kv_block_size=16, **SHARE)
    outputs = llm.generate(PROMPTS, greedy(4, prompt_logprobs=2))
    for prompt, out in zip(PROMPTS, outputs):
        ref = reference_prompt_logprobs(directory, prompt)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for p in range(1, len(prompt)):
            entry = out.prompt_logprobs[p]
            assert entry[prompt[p]].logprob == pytest.approx(float(ref[p - 1, prompt[p]]), abs=2e-3)
            best = min(entry, key=lambda t: entry[t].rank)
            assert entry[best].rank == 1 and entry[best].logprob == pytest.approx(float(ref[p - 1].max()), abs=2e-3)
        assert out.outputs[0].token_ids == reference_greedy(directory, prompt, 4)
