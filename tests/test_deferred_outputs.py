"""The step loop reports a running sequence's newest token one step later, detokenized while the next
forward pass runs (LLMEngine.step). What that could break: lost, doubled or reordered text or tokens, a
delayed first token, an abort or a fault between the token and its report."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.test_engine import TEN_PROMPTS, TIGHT, assert_pools_full, greedy


@pytest.fixture
def llm(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", **TIGHT)
    yield llm
    assert_pools_full(llm)


def step_all(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Runs the requests to the end; per (request, sample): its outputs with the step each came in, and
    the step in which its first token was sampled."""
    engine = llm.engine
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs, first_token_step, seqs, step = {}, {}, {}, 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            outputs.setdefault((out.request_id, out.index), []).append((step, out))
        for request_id, group in engine.sequences.items():
            for seq in group:
                seqs[(request_id, seq.index)] = seq
        for key, seq in seqs.items():
            if seq.num_output_tokens and key not in first_token_step:
                first_token_step[key] = step
    return outputs, first_token_step, seqs


def test_reported_deltas_add_up_to_each_sample_once_and_in_order(llm):
    requests = {
        "greedy": (TEN_PROMPTS[3], greedy(20)),
        "forks": (TEN_PROMPTS[5], SamplingParams(max_tokens=15, temperature=0.8, seed=7, n=3, logprobs=2)),
        "stop": (TEN_PROMPTS[7], greedy(25, stop=["zz", "never"])),
        "eos": (TEN_PROMPTS[2], SamplingParams(max_tokens=30, temperature=1.0, seed=3, min_tokens=4)),
        "one": (TEN_PROMPTS[1], greedy(1)),
    }
    outputs, first_token_step, seqs = step_all(llm, requests)
    tokenizer = llm.tokenizer
    assert set(outputs) == set(seqs) and len(seqs) == 7
    for key, seq in seqs.items():
        steps = [s for s, _ in outputs[key]]
        outs = [o for _, o in outputs[key]]
        assert steps[0] == first_token_step[key]  # the first token is never held back
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == seq.output_token_ids
        text = "".join(o.new_text for o in outs)
        if key[0] == "stop" and isinstance(seq.stop_reason, str):
            assert text == tokenizer.decode(tokens).split(seq.stop_reason)[0]
        else:
            ended_by_token = seq.finish_reason == "stop"
            assert text == tokenizer.decode(tokens[:-1] if ended_by_token else tokens)
        if seq.params.logprobs is not None:
            assert len([lp for o in outs for lp in o.new_logprobs]) == len(tokens)


def test_each_report_carries_its_own_tokens_text(llm):
    """A sequence with a stop string is reported at once (its text is needed to stop it); a one-character
    stop string that never matches holds nothing back, so its reports are the undeferred ones: the
    deferred sequence's reports must be the same (tokens, text) pieces."""
    snowman = "\u2603"
    outputs, _, seqs = step_all(llm, {"deferred": (TEN_PROMPTS[6], greedy(24)),
                                      "at once": (TEN_PROMPTS[6], greedy(24, stop=[snowman]))})
    assert seqs[("at once", 0)].stop_reason is None  # the stop string never matched
    pieces = {key: [(o.new_token_ids, o.new_text) for _, o in outs] for key, outs in outputs.items()}
    assert pieces[("deferred", 0)] == pieces[("at once", 0)]
    assert sum(bool(text) for _, text in pieces[("deferred", 0)]) > 12  # the text streams with its tokens


def test_the_same_tokens_as_one_request_alone(llm, h1_dir):
    """Deferring reports changes nothing the scheduler or sampler sees."""
    solo = LLM(str(h1_dir), device="cpu", dtype="float32")
    params = [greedy(9), greedy(14, stop=["q"]), SamplingParams(max_tokens=12, temperature=0.9, seed=11)]
    together = llm.generate(TEN_PROMPTS[4:7], params)
    for prompt, p, out in zip(TEN_PROMPTS[4:7], params, together):
        alone = solo.generate([prompt], p)[0].outputs[0]
        assert (out.outputs[0].token_ids, out.outputs[0].text) == (alone.token_ids, alone.text)


def test_an_abort_reports_the_held_back_token_and_its_text(llm):
    engine = llm.engine
    engine.add_request("r", TEN_PROMPTS[4], greedy(30))
    reported = []
    for _ in range(4):
        reported += engine.step()
    seq = engine.sequences["r"][0]
    assert len([t for o in reported for t in o.new_token_ids]) < seq.num_output_tokens  # one is held back
    reported += engine.abort("r")
    assert reported[-1].finish_reason == "abort" and reported[-1].request_finished
    tokens = [t for o in reported for t in o.new_token_ids]
    assert tokens == seq.output_token_ids
    assert "".join(o.new_text for o in reported) == llm.tokenizer.decode(tokens)
    assert engine.step() == []  # nothing more about it


def test_a_fault_while_reporting_a_held_back_token_fails_that_request_alone(llm):
    engine = llm.engine
    engine.add_request("bad", TEN_PROMPTS[3], greedy(10))
    engine.add_request("good", TEN_PROMPTS[2], greedy(10))
    while not all(s[0].num_output_tokens >= 2 for s in engine.sequences.values()):
        engine.step()
    bad = engine.sequences["bad"][0]

    def poisoned(token_id):
        raise RuntimeError("injected detokenizer fault")

    bad.detokenizer.add = poisoned
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    bad_outs = [o for o in outputs if o.request_id == "bad"]
    assert bad_outs[-1].finish_reason == "error" and "injected detokenizer fault" in bad_outs[-1].error
    good_outs = [o for o in outputs if o.request_id == "good"]
    assert good_outs[-1].finish_reason == "length" and good_outs[-1].request_finished
