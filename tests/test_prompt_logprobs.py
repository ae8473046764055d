"""Prompt logprobs (SamplingParams.prompt_logprobs) equal transformers' log-softmax of the same checkpoint,
however the prompt is chunked, batched, forked or preempted; max_tokens=0 scores without sampling."""

import pytest

from engine import LLM, SamplingParams
from tests.test_engine import TEN_PROMPTS, TIGHT, assert_pools_full
from tests.tiny_models import reference_greedy, reference_prompt_logprobs

LONG_PROMPTS = [[5 + (11 * i + 5 * j) % 280 for j in range(n)] for i, n in enumerate([45, 1, 2, 33, 70])]


def assert_matches_reference(prompt_logprobs, directory, prompt, k):
    """Entry p is None for p = 0, else the actual token with its rank plus the top-k, all as transformers says."""
    ref = reference_prompt_logprobs(directory, prompt)
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        entry, dist, token = prompt_logprobs[p], ref[p - 1], prompt[p]
        assert next(iter(entry)) == token  # the actual token comes first
        assert entry[token].logprob == pytest.approx(float(dist[token]), abs=1e-4)
        assert entry[token].rank == int((dist > dist[token]).sum()) + 1
        top = dist.topk(k)
        others = {t: lp for t, lp in entry.items() if lp.rank <= k}
        assert sorted(others) == sorted(top.indices.tolist())
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[t].logprob == pytest.approx(v, abs=1e-4)
        assert len(entry) == k + (entry[token].rank > k)


@pytest.mark.parametrize("which", ["h1", "mamba"])
def test_prompt_logprobs_match_transformers_across_chunks(which, h1_dir, mamba_dir):
    directory = h1_dir if which == "h1" else mamba_dir
    llm = LLM(str(directory), device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=16)
    # Prompts longer than the 16-token budget, one of one token, batched with requests that do not score.
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=k) for k in (2, 0, 5, 1, 3)]
    prompts = LONG_PROMPTS + TEN_PROMPTS[3:5]
    params += [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)] * 2
    outputs = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outputs):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert_matches_reference(out.prompt_logprobs, directory, prompt, p.prompt_logprobs)
        assert out.outputs[0].token_ids == reference_greedy(directory, prompt, 3)  # sampling is unaffected
    assert_pools_full(llm)


def test_prompt_logprobs_once_per_request_with_n_samples_and_preemption(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", **TIGHT)
    prompts = TEN_PROMPTS
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=1, n=n)
              for n in [2] + [1] * 9]
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0  # recomputes happened and must not duplicate entries
    for prompt, p, out in zip(prompts, params, outputs):
        assert_matches_reference(out.prompt_logprobs, h1_dir, prompt, 1)
        assert len(out.outputs) == p.n and all(c.token_ids == out.outputs[0].token_ids for c in out.outputs)
    assert outputs[0].outputs[0].token_ids == reference_greedy(h1_dir, prompts[0], 30)
    assert_pools_full(llm)


def test_max_tokens_zero_scores_the_prompt_without_sampling(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_batched_tokens=16, kv_block_size=4)
    steps = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda sched, *rest: steps.append(sum(sched.num_new_tokens)) or execute(sched, *rest)
    out = llm.generate([LONG_PROMPTS[0]], SamplingParams(max_tokens=0, prompt_logprobs=0, n=2))[0]
    assert sum(steps) == len(LONG_PROMPTS[0])  # prefill only, no decode step
    assert [(c.token_ids, c.text, c.finish_reason) for c in out.outputs] == [([], "", "length")] * 2
    assert_matches_reference(out.prompt_logprobs, h1_dir, LONG_PROMPTS[0], 0)
    assert all(lp.decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
               for entry in out.prompt_logprobs[1:] for t, lp in entry.items())
    assert_pools_full(llm)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    full = [5 + i % 250 for i in range(llm.engine.max_model_len)]  # as long as the context: still scored
    assert llm.generate([full], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs[-1]
    with pytest.raises(ValueError, match="context length"):
        llm.generate([full + [5]], SamplingParams(max_tokens=0, prompt_logprobs=0))
    with pytest.raises(ValueError, match="no room"):
        llm.generate([full], SamplingParams(max_tokens=1, prompt_logprobs=0))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_scoring_rows_are_bounded_per_block(h1_dir, monkeypatch):
    """Logits of prompt positions are computed ROWS_PER_BLOCK rows at a time, never for the whole chunk."""
    from engine import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_BLOCK", 4)
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_batched_tokens=64)
    widths = []
    compute_logits = llm.engine.runner.model.compute_logits
    llm.engine.runner.model.compute_logits = lambda h: widths.append(h.shape[0]) or compute_logits(h)
    out = llm.generate([LONG_PROMPTS[3]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert max(widths) == 4 and sum(widths) == len(LONG_PROMPTS[3])  # 32 scored rows + 1 sampling row
    assert_matches_reference(out.prompt_logprobs, h1_dir, LONG_PROMPTS[3], 2)


@pytest.mark.parametrize("preempt_after_steps", [2, 7])  # mid-prefill (16 of 45 tokens), and while decoding
def test_preempted_recompute_scores_nothing_twice(h1_dir, preempt_after_steps):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_batched_tokens=8, kv_block_size=4)
    engine = llm.engine
    engine.add_request("r", LONG_PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                           prompt_logprobs=1))
    outputs = []
    for _ in range(preempt_after_steps):
        outputs += engine.step()
    (seq,) = engine.sequences["r"]
    engine.scheduler.preempt(seq)
    while engine.has_unfinished():
        outputs += engine.step()
    reported = [out.prompt_logprobs for out in outputs if out.prompt_logprobs is not None]
    assert len(reported) == 1  # once per request
    assert_matches_reference(reported[0], h1_dir, LONG_PROMPTS[0], 1)
    assert sum((out.new_token_ids for out in outputs), []) == reference_greedy(h1_dir, LONG_PROMPTS[0], 4)
    assert_pools_full(llm)
