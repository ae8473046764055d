"""Hostile values and faults at the engine level: every state-machine operation completes or leaves nothing
behind, one request's values or faults never touch another's output, and refusals come before queueing."""

import pytest

import engine.llm_engine
from engine import LLM, SamplingParams
from engine.request_checks import RequestError
from tests.test_engine import TEN_PROMPTS, assert_pools_full, greedy


@pytest.fixture
def llm(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=8)
    yield llm
    assert_pools_full(llm)


def run(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[tuple[str, int], list]:
    """Steps the engine until idle; every output of every request, by (request id, sample index)."""
    for request_id, (prompt, params) in requests.items():
        llm.engine.add_request(request_id, prompt, params)
    outputs: dict[tuple[str, int], list] = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            outputs.setdefault((out.request_id, out.index), []).append(out)
    return outputs


def test_fork_with_a_seed_at_the_top_of_its_range(llm):
    """n=2 with seed 2**64 - 1 used to fail while forking (seed + 1 overflows the generator), leaving a
    half-forked child that wedged every later step."""
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=2**64 - 1, ignore_eos=True)
    outputs = run(llm, {"r": (TEN_PROMPTS[3], params)})
    assert sorted(outputs) == [("r", 0), ("r", 1)]
    assert all(outs[-1].finish_reason == "length" for outs in outputs.values())
    assert llm.generate([TEN_PROMPTS[1]], greedy(3))[0].outputs[0].finish_reason == "length"


def test_hostile_sampling_values_are_refused_or_harmless(llm):
    solo = llm.generate([TEN_PROMPTS[2]], greedy(5))[0].outputs[0].token_ids
    # A top_k above the vocabulary keeps every token: the same as no top_k, even at 2**64.
    wide = llm.generate([TEN_PROMPTS[2]], greedy(5, top_k=2**64))[0].outputs[0].token_ids
    assert wide == solo
    for bad, param in (({"stop_token_ids": [-1000]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
                       ({"stop_token_ids": [300]}, "stop_token_ids"), ({"logit_bias": {-1: 1.0}}, "logit_bias")):
        with pytest.raises(RequestError) as e:
            llm.generate([TEN_PROMPTS[2]], greedy(5, min_tokens=1, **bad))
        assert e.value.param == param
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match="at most 256 strings"):  # each is searched at every step
        SamplingParams(stop=[f"s{i}" for i in range(257)])
    with pytest.raises(ValueError, match="at most 256 strings"):
        SamplingParams(stop="x" * 1025)
    with pytest.raises(ValueError, match="n must be an integer"):
        SamplingParams(n=True)
    # A vanishing temperature is greedy, not garbage from logits / 1e-45.
    tiny = SamplingParams(max_tokens=5, temperature=1e-45, ignore_eos=True)
    assert llm.generate([TEN_PROMPTS[2]], tiny)[0].outputs[0].token_ids == solo


def test_generate_checks_every_prompt_before_queueing_any(llm):
    with pytest.raises(RequestError, match=r"prompts\[1\]"):
        llm.generate([TEN_PROMPTS[1], [5, 300]], greedy(3))
    assert not llm.engine.has_unfinished() and not llm.engine.sequences
    assert llm.generate([TEN_PROMPTS[1]], greedy(3))[0].outputs[0].finish_reason == "length"


def test_a_fault_after_sampling_fails_one_request_and_delivers_the_others(llm, monkeypatch):
    """A fault in one sequence's stop check, in a step where other sequences finish: they are delivered,
    the faulty request ends with an error, nothing stays in the engine."""
    solo = {i: llm.generate([TEN_PROMPTS[i]], greedy(3))[0].outputs[0].token_ids for i in (1, 2)}
    real_check_stop = engine.llm_engine.check_stop

    def poisoned(seq, *args):
        if seq.request_id == "bad" and seq.num_output_tokens == 2:
            raise RuntimeError("injected fault")
        return real_check_stop(seq, *args)

    monkeypatch.setattr(engine.llm_engine, "check_stop", poisoned)
    outputs = run(llm, {"a": (TEN_PROMPTS[1], greedy(3)), "bad": (TEN_PROMPTS[3], greedy(8, n=2)),
                        "b": (TEN_PROMPTS[2], greedy(3))})
    for request_id, i in (("a", 1), ("b", 2)):
        outs = outputs[(request_id, 0)]
        assert [t for o in outs for t in o.new_token_ids] == solo[i]
        assert outs[-1].finish_reason == "length" and outs[-1].request_finished
    for index in (0, 1):
        last = outputs[("bad", index)][-1]
        assert last.finish_reason == "error" and "injected fault" in last.error
    assert not llm.engine.sequences


def test_a_batched_sampling_fault_is_isolated_to_its_row(llm, monkeypatch):
    """If sampling the whole batch fails, rows are sampled one by one: only the faulty row's request fails."""
    real_sample = engine.llm_engine.sample
    solo = llm.generate([TEN_PROMPTS[1]], greedy(4))[0].outputs[0].token_ids

    def poisoned(logits, seqs, eos, grammar_mask=None):
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("injected sampling fault")
        return real_sample(logits, seqs, eos, grammar_mask)

    monkeypatch.setattr(engine.llm_engine, "sample", poisoned)
    outputs = run(llm, {"good": (TEN_PROMPTS[1], greedy(4)), "bad": (TEN_PROMPTS[2], greedy(4))})
    assert [t for o in outputs[("good", 0)] for t in o.new_token_ids] == solo
    assert outputs[("bad", 0)][-1].finish_reason == "error"


def test_stats_count_requests_and_an_empty_kv_pool_is_unused(llm, mamba_dir):
    llm.engine.add_request("forked", TEN_PROMPTS[1], greedy(6, n=3))
    llm.engine.add_request("single", TEN_PROMPTS[2], greedy(6))
    llm.engine.step()
    llm.engine.step()
    assert len(llm.engine.scheduler.running) == 4  # three samples + one
    assert llm.engine.stats().num_running == 2
    while llm.engine.has_unfinished():
        llm.engine.step()
    mamba = LLM(str(mamba_dir), device="cpu", dtype="float32")
    assert mamba.engine.cache.blocks.capacity == 0 and mamba.engine.stats().kv_cache_usage == 0.0
