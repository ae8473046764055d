"""Tensor parallelism on 2 GPUs (NCCL, CUDA graphs with the all-reduces captured): TP=2 against TP=1 on the
tiny checkpoints. fp32: the same greedy tokens; bf16: TP=1's continuation scored by TP=2 (prompt logprobs,
so one early near-tie cannot make the rest diverge) within bf16's rounding. Skipped without 2 GPUs."""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

PROMPTS = [list(range(10, 40)), [7, 8, 9], [3] * 20 + [4, 5]]
ENGINE = dict(device="cuda", max_num_seqs=4, max_model_len=128, gpu_memory_utilization=0.3)


def generate(directory, dtype: str, tp: int, params: SamplingParams, prompts=PROMPTS) -> list:
    llm = LLM(str(directory), dtype=dtype, tensor_parallel_size=tp, **ENGINE)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.close()


@pytest.mark.parametrize("model", ["h1_dir", "mamba_dir"])
def test_fp32_greedy_tokens_match(request, model) -> None:
    directory = request.getfixturevalue(model)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    single, split = (generate(directory, "float32", tp, params) for tp in (1, 2))
    for a, b in zip(single, split):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [lp[t] for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)] == pytest.approx(
            [lp[t] for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)], abs=1e-3)


@pytest.mark.parametrize("model", ["h1_dir", "mamba_dir"])
def test_bf16_scores_of_the_same_continuation_match(request, model) -> None:
    directory = request.getfixturevalue(model)
    single = generate(directory, "bfloat16", 1, SamplingParams(max_tokens=12, temperature=0))
    texts = [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, single)]
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    scored = [generate(directory, "bfloat16", tp, score, texts) for tp in (1, 2)]
    for a, b in zip(*scored):
        lps_a = [next(iter(e.values())).logprob for e in a.prompt_logprobs[1:]]
        lps_b = [next(iter(e.values())).logprob for e in b.prompt_logprobs[1:]]
        assert lps_a == pytest.approx(lps_b, abs=0.1)
