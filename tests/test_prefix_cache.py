"""Prefix caching is exact: with the cache on every output is token-for-token what it is with the cache
off (fp32, greedy and seeded sampling), hits really happen where the design says they do, and after
every workload no sequence holds anything and flushing the cache leaves every pool full."""

import random

import pytest

from engine import LLM, SamplingParams
from tests.test_engine import assert_pools_full

BS = 4  # small KV blocks, so short prompts span several blocks and end mid-block
TIGHT = dict(max_num_seqs=3, max_num_batched_tokens=16, kv_block_size=BS, num_kv_blocks=40)


def engines(model_dir, checkpoints: int = 8, **args) -> tuple[LLM, LLM]:
    """The same engine with the prefix cache on (and `checkpoints` state checkpoints) and off."""
    args = dict(device="cpu", dtype="float32", kv_block_size=BS) | args
    return (LLM(str(model_dir), prefix_cache_checkpoints=checkpoints, **args),
            LLM(str(model_dir), enable_prefix_caching=False, **args))


@pytest.fixture
def h1_pair(h1_dir):
    on, off = engines(h1_dir, max_num_seqs=4)
    yield on, off
    assert_pools_full(on)
    assert_pools_full(off)


def greedy(max_tokens=6, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def seeded(max_tokens=6, seed=11, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True, **kw)


def tokens(result):
    return [c.token_ids for c in result.outputs]


def both(pair, prompts, params):
    """Runs the same requests (submitted together) on the cached and the uncached engine."""
    on, off = pair
    got, want = on.generate(prompts, params, use_tqdm=False), off.generate(prompts, params, use_tqdm=False)
    assert [tokens(r) for r in got] == [tokens(r) for r in want]
    assert [[c.text for c in r.outputs] for r in got] == [[c.text for c in r.outputs] for r in want]
    assert all(r.num_cached_tokens == 0 for r in want)
    return got


def chat(pair, turns: int, params, user_len: int = 6):
    """A conversation resent whole every turn: prompt = previous prompt + reply + a new user turn."""
    rng = random.Random(turns)
    prompt, cached = [], []
    for _ in range(turns):
        prompt = prompt + [rng.randrange(5, 290) for _ in range(user_len)]
        result = both(pair, [prompt], params)[0]
        cached.append(result.num_cached_tokens)
        prompt = prompt + result.outputs[0].token_ids
    return cached


def test_multi_turn_chat_resumes_after_the_previous_reply(h1_pair):
    cached = chat(h1_pair, 5, greedy(5))
    # Each turn resumes from the state the previous sequence ended with: everything but its last token.
    assert cached[0] == 0
    assert cached[1:] == [6 * k + 5 * k - 1 for k in range(1, 5)]
    stats = h1_pair[0].engine.stats()
    assert stats.prefix_cache_hits == sum(cached) and stats.prefix_cache_queries == sum(6 * k + 5 * (k - 1)
                                                                                        for k in range(1, 6))


def test_multi_turn_chat_with_seeded_sampling(h1_pair):
    assert sum(chat(h1_pair, 4, seeded(5))) > 0


def test_shared_system_prompt_with_different_suffixes(h1_pair):
    system = [7 + i % 200 for i in range(22)]  # 5 full blocks of 4 and 2 tokens
    suffixes = [[100 + j, 50 + 3 * j, 9 + j] for j in range(4)]
    cached = [both(h1_pair, [system + s], greedy())[0].num_cached_tokens for s in suffixes]
    # The second request reveals the shared prefix: its prefill stops at 20 tokens for a checkpoint
    # there, which every later request starts from.
    assert cached == [0, 0, 20, 20]
    # Several at once after that: all hit, and a different system prompt misses.
    results = both(h1_pair, [system + [200 + j] for j in range(3)] + [[9] * 25], greedy())
    assert [r.num_cached_tokens for r in results] == [20, 20, 20, 0]


def test_identical_prompts_and_a_prefix_of_a_cached_prompt(h1_pair):
    prompt = [11 + 5 * i % 280 for i in range(18)]
    cached = [both(h1_pair, [prompt], greedy())[0].num_cached_tokens for _ in range(3)]
    assert cached == [0, 0, 16]  # the hit always leaves the last prompt token to compute
    # A prefix of a cached prompt: no checkpoint at 12 yet, so the first one takes it there.
    assert [both(h1_pair, [prompt[:13]], greedy())[0].num_cached_tokens for _ in range(2)] == [0, 12]
    # A prompt continuing a finished sequence resumes from its state, taken mid-block (10 + 5 tokens).
    first = both(h1_pair, [prompt[:10]], greedy(6))[0]
    again = both(h1_pair, [prompt[:10] + first.outputs[0].token_ids[:5] + [99]], greedy())[0]
    assert again.num_cached_tokens == 15


def test_parallel_samples_and_stop_strings_on_a_hit(h1_pair):
    prompt = [30 + i for i in range(14)]
    both(h1_pair, [prompt], greedy())  # a checkpoint at its end, mid-block
    results = both(h1_pair, [prompt + [61, 62]], [seeded(6, n=3)])
    assert results[0].num_cached_tokens == 14 and len({tuple(t) for t in tokens(results[0])}) > 1
    free = both(h1_pair, [prompt + [63]], greedy(10))[0].outputs[0]
    stop = free.text[3:5]
    assert len(stop) == 2
    out = both(h1_pair, [prompt + [63]], greedy(10, stop=[stop]))[0]
    assert out.num_cached_tokens > 0 and out.outputs[0].finish_reason == "stop"


def test_abort_mid_prefill_leaves_a_usable_checkpoint(h1_dir):
    on, off = engines(h1_dir, max_num_seqs=2, max_num_batched_tokens=8)
    prompt = [40 + 3 * i % 250 for i in range(30)]
    on.engine.add_request("a", prompt, greedy())
    for _ in range(2):
        on.engine.step()  # 16 of 30 prompt tokens computed
    on.engine.abort("a")
    result = both((on, off), [prompt], greedy())[0]
    assert result.num_cached_tokens == 16
    assert_pools_full(on)


def test_preemption_and_eviction_under_kv_and_state_pressure(h1_dir):
    on, off = engines(h1_dir, checkpoints=2, **(TIGHT | dict(num_kv_blocks=24)))
    system = [21 + i for i in range(12)]
    prompts = [system + [100 + 7 * i + j for j in range(2 + 3 * i)] for i in range(6)]
    for _ in range(2):
        both((on, off), prompts, greedy(20))
    stats = on.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.prefix_cache_evicted_checkpoints > 0 and stats.prefix_cache_evicted_blocks > 0
    assert_pools_full(on)


def test_falcon_mamba_checkpoints_without_kv(mamba_dir):
    on, off = engines(mamba_dir, max_num_seqs=3)
    cached = chat((on, off), 4, greedy(4))
    assert cached[1:] == [6 * k + 4 * k - 1 for k in range(1, 4)]
    system = [50 + i for i in range(10)]
    cached = [both((on, off), [system + [200 + j, 3]], greedy())[0].num_cached_tokens for j in range(3)]
    assert cached == [0, 0, 8]
    assert on.engine.cache.block_size == 0 and on.engine.cache.blocks.capacity == 0
    assert_pools_full(on)


def test_prompt_logprobs_requests_bypass_the_hit(h1_pair):
    on, _ = h1_pair
    prompt = [5 + i for i in range(13)]
    for _ in range(3):
        on.generate([prompt], greedy(), use_tqdm=False)
    scored = on.generate([prompt], greedy(prompt_logprobs=1), use_tqdm=False)[0]  # every position computed
    assert scored.num_cached_tokens == 0 and len(scored.prompt_logprobs) == len(prompt)
    assert on.generate([prompt], greedy(), use_tqdm=False)[0].num_cached_tokens == 12


def test_random_workload(h1_dir):
    """Chats, shared prefixes, repeats, prefixes of earlier prompts, n > 1, stop strings and seeded sampling,
    several requests at a time on pools that force preemption and eviction, and aborts mid-way."""
    on, off = engines(h1_dir, checkpoints=3, max_num_seqs=4, max_num_batched_tokens=12, num_kv_blocks=14)
    rng = random.Random(5)
    history = [[rng.randrange(5, 290) for _ in range(rng.randrange(3, 14))] for _ in range(3)]
    for wave in range(6):
        prompts, params = [], []
        for _ in range(rng.randrange(2, 5)):
            base = rng.choice(history)
            kind = rng.choice(["extend", "same", "prefix", "new"])
            prompt = {"extend": base + [rng.randrange(5, 290) for _ in range(rng.randrange(1, 6))], "same": base,
                      "prefix": base[:max(1, rng.randrange(len(base)))],
                      "new": [rng.randrange(5, 290) for _ in range(rng.randrange(8, 30))]}[kind]
            prompts.append(prompt[:32])
            p = rng.choice([greedy(rng.randrange(4, 14)), seeded(rng.randrange(4, 14), seed=wave),
                            greedy(6, n=2), greedy(8, stop=["e", "a"])])
            params.append(p)
        results = both((on, off), prompts, params)
        history += [p + r.outputs[0].token_ids for p, r in zip(prompts, results)]
        if wave == 3:  # an abort mid-prefill between waves
            on.engine.add_request("x", history[-1][:30], greedy())
            on.engine.step()
            on.engine.abort("x")
    stats = on.engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    assert stats.prefix_cache_evicted_checkpoints > 0
    assert_pools_full(on)
    assert_pools_full(off)
