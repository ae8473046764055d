"""Async scheduling (LLMEngine.step): a decode step is launched with the previous step's sampled tokens
still on the device, and a sequence that those tokens end runs one extra, padded row. What that could
break: tokens, logprobs, texts, finish reasons or usage that differ from stepping one step at a time; a
max_tokens overshoot; an extra row writing state or KV that the prefix cache keeps; aborts and joins."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampled_tokens import SampledTokens
from kernels import PAD_SLOT
from tests.test_engine import TEN_PROMPTS, assert_pools_full, greedy
from tests.test_step_inputs import _graphs
from tests.tiny_models import GPU_TEST_MEMORY


def test_sampled_tokens_fill_inputs_and_pad_the_rows_they_end():
    sampled = SampledTokens(torch.tensor([7, 2, 9]), rows=[2, 0, 1], stop_ids=[[2], [], [2, 5]])
    input_ids, slot_mapping = torch.zeros(3, dtype=torch.long), torch.tensor([40, 41, 42])
    state_slots, seq_lens = torch.tensor([3, 4, 5], dtype=torch.int32), torch.tensor([8, 9, 10], dtype=torch.int32)
    sampled.write_inputs(input_ids, state_slots, slot_mapping, seq_lens)
    assert input_ids.tolist() == [9, 7, 2]
    assert state_slots.tolist() == [3, 4, PAD_SLOT]  # row 2's token 2 ends it: padding from here
    assert slot_mapping.tolist() == [40, 41, -1] and seq_lens.tolist() == [8, 9, 0]


def test_decode_graphs_read_the_sampled_tokens_and_pad_the_rows_they_end():
    """What the captured graph reads (a stand-in records it): gathered tokens, the done row as padding,
    the other rows and the bucket's padding rows as the host staged them."""
    graphs = _graphs(max_num_seqs=8, block_size=4)
    sampled = SampledTokens(torch.tensor([50, 2, 60, 70]), rows=[3, 1, 0], stop_ids=[[2], [2, 9], [2]])
    graphs.run([-1] * 3, [5, 9, 2], [4, 6, 7], [[10, 11], [12, 13, 14], [15]], [PAD_SLOT] * 3, sampled)
    seen = graphs.graphs[4].seen[-1]
    assert seen["input_ids"].tolist() == [70, 2, 50, 0]
    assert seen["state_slots"].tolist() == [4, PAD_SLOT, 7, PAD_SLOT]
    assert seen["slot_mapping"].tolist() == [11 * 4 + 1, -1, 15 * 4 + 2, -1]
    assert seen["seq_lens"].tolist() == [6, 0, 3, 0]
    assert seen["positions"].tolist() == [5, 9, 2, 0]


def reference_outputs(h1_dir, prompts, max_tokens, device="cpu"):
    kw = dict(gpu_memory_utilization=GPU_TEST_MEMORY, max_num_batched_tokens=128) if device == "cuda" else {}
    llm = LLM(str(h1_dir), device=device, dtype="float32", async_scheduling=False, **kw)
    return [out.outputs[0] for out in llm.generate(prompts, greedy(max_tokens))]


def run_script(h1_dir, async_scheduling: bool, script: dict, device: str = "cpu", **engine_kw):
    """Steps an engine to the end, adding (request id, prompt, params) or aborting (request id) before the
    step numbered in `script`. Per request: every output field in order; and how many steps ran ahead."""
    if device == "cuda":  # CUDA graphs for decode (where the tokens are gathered on the device), few prefill ones
        engine_kw.update(gpu_memory_utilization=GPU_TEST_MEMORY, max_num_batched_tokens=128)
    llm = LLM(str(h1_dir), device=device, dtype="float32", async_scheduling=async_scheduling, **engine_kw)
    assert (llm.engine.runner.graphs is not None) == (device == "cuda")
    engine = llm.engine
    ahead = []
    execute = engine.runner.execute
    engine.runner.execute = lambda sched, sampled=None: ahead.append(sampled is not None) or execute(sched, sampled)
    outputs = defaultdict(list)

    def record(outs):
        for o in outs:
            outputs[o.request_id].append((o.new_token_ids, o.new_text, o.new_logprobs, o.finished, o.finish_reason,
                                          o.stop_reason, o.num_prompt_tokens, o.num_cached_tokens,
                                          o.request_finished))

    step = 0
    while engine.has_unfinished() or step <= max(script):
        for action in script.get(step, []):
            if isinstance(action, str):
                record(engine.abort(action))
            else:
                engine.add_request(*action)
        record(engine.step())
        step += 1
    assert_pools_full(llm)
    return dict(outputs), sum(ahead)


def assert_same_either_way(h1_dir, script, **engine_kw):
    """Everything the same, but logprobs only to float rounding: the step after a sequence ends on a stop
    token has its padded row in the batch, and CPU matmuls round differently at other batch sizes."""
    sync, sync_ahead = run_script(h1_dir, False, script, **engine_kw)
    overlapped, ahead = run_script(h1_dir, True, script, **engine_kw)
    assert sync_ahead == 0
    assert overlapped.keys() == sync.keys()
    for request_id in sync:
        assert len(overlapped[request_id]) == len(sync[request_id]), request_id
        for got, want in zip(overlapped[request_id], sync[request_id]):
            assert got[:2] + got[3:] == want[:2] + want[3:], request_id
            if want[2] is not None:
                assert [lp.keys() for lp in got[2]] == [lp.keys() for lp in want[2]]
                assert [v for lp in got[2] for v in lp.values()] == pytest.approx(
                    [v for lp in want[2] for v in lp.values()], rel=1e-5, abs=1e-5)
    return overlapped, ahead


ON_CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_mixed_stops_joins_and_aborts_are_the_same_as_stepping(h1_dir, prefix_caching, device):
    prompts = [TEN_PROMPTS[i] for i in (3, 5, 7, 2, 8, 4)]
    ref = reference_outputs(h1_dir, prompts, 24, device)
    stop_token = ref[0].token_ids[6]  # ends request "stop-id" at its 7th token at the latest
    stop_text = ref[2].text[5:7]  # a stop string request "stop-str" produces
    assert stop_text and stop_token != ref[0].token_ids[0]
    script = {
        0: [("stop-id", prompts[0], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token])),
            ("seeded", prompts[1], SamplingParams(max_tokens=18, temperature=0.9, seed=5, logprobs=2)),
            ("stop-str", prompts[2], greedy(22, stop=[stop_text])),
            ("min", prompts[0], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_token],
                                               min_tokens=10))],
        5: [("joins", prompts[3], SamplingParams(max_tokens=9, temperature=0.7, top_k=20, logprobs=1)),
            ("aborted", prompts[4], greedy(30))],
        9: [("unseeded", prompts[5], SamplingParams(max_tokens=7, temperature=1.0, top_p=0.9))],
        12: ["aborted"],
    }
    outputs, ahead = assert_same_either_way(h1_dir, script, max_num_seqs=8, enable_prefix_caching=prefix_caching,
                                            device=device)
    assert ahead >= 5  # the overlap did run
    assert outputs["stop-id"][-1][4:6] == ("stop", stop_token)
    assert outputs["stop-str"][-1][4:6] == ("stop", stop_text)
    assert outputs["aborted"][-1][4] == "abort"
    lengths = {rid: sum(len(o[0]) for o in outs) for rid, outs in outputs.items()}
    assert lengths["seeded"] <= 18 and lengths["joins"] == 9 and lengths["min"] >= 10


def test_max_tokens_is_never_overshot_and_every_row_ends_at_once(h1_dir):
    script = {0: [(f"r{n}", TEN_PROMPTS[n], greedy(n)) for n in range(1, 7)]}
    outputs, ahead = assert_same_either_way(h1_dir, script, max_num_seqs=8)
    assert ahead >= 4
    for n in range(1, 7):
        assert sum(len(o[0]) for o in outputs[f"r{n}"]) == n and outputs[f"r{n}"][-1][4] == "length"


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_the_prefix_cache_keeps_no_extra_token(h1_dir, device):
    """Requests ending on a stop token leave their final state to the prefix cache; follow-ups that extend
    them hit it. An extra row that wrote that state (or its KV) would change the follow-ups' outputs."""
    prompts = [TEN_PROMPTS[i] for i in (3, 6, 9)]
    ref = reference_outputs(h1_dir, prompts, 12, device)
    stops = [r.token_ids[4 + i] for i, r in enumerate(ref)]  # token 5, 6 and 7
    first = {0: [(f"a{i}", p, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stops[i]]))
                 for i, p in enumerate(prompts)]}
    followups = {}
    for i, (p, r) in enumerate(zip(prompts, ref)):
        end = r.token_ids.index(stops[i]) + 1
        followups[f"b{i}"] = p + r.token_ids[:end] + [11, 12, 13]
    script = dict(first)
    script[14] = [(rid, p, greedy(8)) for rid, p in followups.items()]
    block_size = 4 if device == "cpu" else 16  # the GPU tests' block size; 4 puts more block ends in reach
    outputs, ahead = assert_same_either_way(h1_dir, script, max_num_seqs=8, kv_block_size=block_size, device=device)
    assert ahead >= 4
    assert all(outputs[f"b{i}"][0][7] >= len(prompts[i]) for i in range(3))  # they did hit the cache


def test_stop_strings_with_the_prefix_cache_step_one_at_a_time(h1_dir):
    script = {0: [("s", TEN_PROMPTS[4], greedy(10, stop=["never matches"])), ("g", TEN_PROMPTS[5], greedy(10))]}
    _, ahead = assert_same_either_way(h1_dir, script, max_num_seqs=8)
    assert ahead == 0  # a stop string could end "s" where the device cannot tell
