"""Continuous batching: outputs do not depend on batch mates, chunking or preemption; every stop
condition; aborts and errors free what they held; pools are full again after every workload."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import EngineDeadError
from tests.tiny_models import EOS, reference_greedy

TEN_PROMPTS = [[5 + (7 * i + 3 * j) % 250 for j in range(2 + 4 * i)] for i in range(10)]  # 2..38 tokens
TIGHT = dict(max_num_seqs=3, max_num_batched_tokens=16, kv_block_size=4, num_kv_blocks=40)


def assert_pools_full(llm: LLM) -> None:
    """No sequence holds a slot, block or reference; flushing the prefix cache then empties every pool."""
    engine, cache = llm.engine, llm.engine.cache
    assert not engine.has_unfinished() and not engine.sequences
    assert cache.num_free_slots == cache.slots.capacity
    assert cache.num_free_blocks == cache.blocks.capacity
    assert all(refs == 0 for refs in cache.block_refs)
    assert llm.reset_prefix_cache()
    assert cache.checkpoint_rows.num_free == cache.checkpoint_rows.capacity
    assert cache.blocks.num_free == cache.blocks.capacity


@pytest.fixture
def tight_h1(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", **TIGHT)
    yield llm
    assert_pools_full(llm)


@pytest.fixture
def h1(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=8)
    yield llm
    assert_pools_full(llm)


def greedy(max_tokens=12, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_ten_requests_under_preemption_and_chunking_match_transformers(tight_h1, h1_dir):
    outputs = tight_h1.generate(TEN_PROMPTS, greedy(30))
    assert tight_h1.engine.scheduler.num_preemptions > 0  # the pool really was too small
    for prompt, out in zip(TEN_PROMPTS, outputs):
        assert out.outputs[0].token_ids == reference_greedy(h1_dir, prompt, 30)


def test_falcon_mamba_batching_matches_transformers(mamba_dir):
    llm = LLM(str(mamba_dir), device="cpu", dtype="float32", max_num_seqs=3, max_num_batched_tokens=16)
    outputs = llm.generate(TEN_PROMPTS[:6], greedy(10))
    for prompt, out in zip(TEN_PROMPTS, outputs):
        assert out.outputs[0].token_ids == reference_greedy(mamba_dir, prompt, 10)
    assert_pools_full(llm)


def test_seeded_sampling_is_batch_invariant(tight_h1):
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = tight_h1.generate([TEN_PROMPTS[4]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 9
    batch = tight_h1.generate(TEN_PROMPTS[:4] + [TEN_PROMPTS[4]] + TEN_PROMPTS[5:], others[:4] + [seeded] + others[4:])
    assert batch[4].outputs[0].token_ids == alone
    again = tight_h1.generate([TEN_PROMPTS[4]], seeded)[0].outputs[0].token_ids
    assert again == alone


def test_parallel_samples_share_the_prefill(h1, h1_dir):
    prompt = TEN_PROMPTS[5]  # 22 tokens: its last KV block is partly filled, so forks copy it
    steps = []
    execute = h1.engine.runner.execute
    h1.engine.runner.execute = lambda sched, *rest: steps.append(sum(sched.num_new_tokens)) or execute(sched, *rest)
    out = h1.generate([prompt], greedy(6, n=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    reference = reference_greedy(h1_dir, prompt, 6)
    assert all(c.token_ids == reference for c in out.outputs)
    assert sum(steps) == len(prompt) + 3 * 5  # one prefill, then three decodes per step
    sampled = h1.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, n=4, seed=7, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1


def test_eos_and_ignore_eos(h1):
    force_eos = {EOS: 100.0}
    out = h1.generate([[5, 6]], SamplingParams(max_tokens=5, temperature=0, logit_bias=force_eos))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == [EOS] and out.text == ""
    out = h1.generate([[5, 6]], SamplingParams(max_tokens=5, temperature=0, logit_bias=force_eos,
                                               ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == [EOS] * 5
    out = h1.generate([[5, 6]], SamplingParams(max_tokens=5, temperature=0, logit_bias=force_eos,
                                               min_tokens=3))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 4 and out.token_ids[-1] == EOS
    assert EOS not in out.token_ids[:3]


def test_stop_token_ids_and_max_tokens(h1):
    free = h1.generate([TEN_PROMPTS[3]], greedy(10))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = h1.generate([TEN_PROMPTS[3]], greedy(10, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == free.token_ids[: first + 1]


def test_stop_string_across_token_boundaries(h1):
    prompt = TEN_PROMPTS[6]
    free = h1.generate([prompt], greedy(16))[0].outputs[0]
    pieces = [h1.tokenizer.decode([t]) for t in free.token_ids]
    # A stop string made of the end of token 5's text and the start of token 6's.
    stop = (pieces[5][-1:] + pieces[6][:1]) if pieces[5] and pieces[6] else free.text[5:7]
    assert len(stop) == 2
    cut = free.text.find(stop)
    out = h1.generate([prompt], greedy(16, stop=[stop, "never-there"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == free.text[:cut]
    out = h1.generate([prompt], greedy(16, stop=stop, include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == free.text[: cut + len(stop)]


def test_abort_frees_everything(tight_h1):
    engine = tight_h1.engine
    for i, prompt in enumerate(TEN_PROMPTS[:5]):
        engine.add_request(f"r{i}", prompt, greedy(20, n=2 if i == 1 else 1))
    for _ in range(4):
        engine.step()
    assert engine.cache.num_free_slots < engine.cache.slots.capacity
    for i in range(5):
        outputs = engine.abort(f"r{i}")
        assert all(o.finish_reason == "abort" for o in outputs) and outputs[-1].request_finished


def test_requests_that_can_never_run_are_rejected(tight_h1):
    with pytest.raises(ValueError, match="maximum context length"):
        tight_h1.generate([[5] * 500], greedy(20))
    with pytest.raises(ValueError, match="KV blocks"):  # 40 blocks of 4 = 160 tokens
        tight_h1.generate([[5] * 100], greedy(100))
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 300\)"):
        tight_h1.generate([[5, 300]], greedy())
    with pytest.raises(ValueError, match="empty"):
        tight_h1.generate([[]], greedy())


def test_a_failing_forward_pass_stops_the_engine(h1_dir):
    """The forward pass touches every sequence's caches: after a fault there the engine refuses to go on
    (the server reports it unhealthy) rather than serve from state that may be corrupt."""
    engine = LLM(str(h1_dir), device="cpu", dtype="float32").engine
    calls = {"n": 0}
    execute = engine.runner.execute

    def flaky(sched, sampled=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return execute(sched, sampled)

    engine.runner.execute = flaky
    engine.add_request("a", TEN_PROMPTS[2], greedy(5))
    engine.step()
    with pytest.raises(EngineDeadError, match="injected fault"):
        engine.step()
    engine.runner.execute = execute
    with pytest.raises(EngineDeadError, match="injected fault"):  # and stays stopped
        engine.step()


def test_logprobs_include_the_sampled_token(h1):
    out = h1.generate([TEN_PROMPTS[1]], SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=2,
                                                       ignore_eos=True))[0].outputs[0]
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 2 <= len(entry) <= 3
        assert all(v <= 0 for v in entry.values())
        assert torch.tensor(list(entry.values())).exp().sum() <= 1.0 + 1e-5


def test_decodes_are_not_stalled_by_a_long_prefill(h1_dir):
    """A running request keeps getting a token every step while a long prompt that arrived after it is
    prefilled in budget-sized chunks (running sequences are scheduled before newer ones)."""
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("short", [5, 6, 7], greedy(40))
    engine.step()  # "short" is prefilled and decoding
    engine.add_request("long", [9] * 60, greedy(2))
    short = engine.sequences["short"][0]
    for _ in range(8):  # "long" needs 8 steps of prefill chunks
        before = short.num_output_tokens
        engine.step()  # (its output may be reported by the next step: see LLMEngine.step)
        assert short.num_output_tokens == before + 1
    while engine.has_unfinished():
        engine.step()
    assert_pools_full(llm)


def test_random_workload_with_forks_preemption_and_abort(h1_dir):
    """Random prompt lengths, max_tokens and n on a pool that forces preemption, one request aborted
    mid-way: every sample equals its prompt's solo greedy run, and the pools are full at the end."""
    import random

    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=5, max_num_batched_tokens=12,
              kv_block_size=4, num_kv_blocks=22)
    solo = LLM(str(h1_dir), device="cpu", dtype="float32")
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 290) for _ in range(rng.randrange(1, 30))] for _ in range(14)]
    params = [greedy(rng.randrange(1, 25), n=rng.choice([1, 1, 2, 3])) for _ in prompts]
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    tokens: dict[tuple[str, int], list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        steps += 1
        if steps == 7:
            engine.abort("3")
    assert engine.scheduler.num_preemptions > 0
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if i == 3:
            continue
        reference = solo.generate([prompt], greedy(p.max_tokens))[0].outputs[0].token_ids
        assert [tokens[(str(i), k)] for k in range(p.n)] == [reference] * p.n
    assert_pools_full(llm)
