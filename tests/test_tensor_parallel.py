"""Tensor parallelism on the CPU (gloo, 2 processes, fp32): the same greedy tokens and logprobs as one
process, on the tiny Falcon-H1 (Mamba groups and KV heads split, or fewer than the ranks: replicated,
with the gated norm summed across ranks) and FalconMamba (tied head), through chunked prefill,
preemption, n > 1 forks, prompt logprobs and prefix-cache hits. One spawned pair per model."""

from __future__ import annotations

import dataclasses
import time

import pytest

from engine.config import load_model_config
from engine.distributed.group import TensorParallel
from engine.distributed.layers import rank_units
from engine.llm import LLM
from engine.llm_engine import EngineDeadError
from engine.loader import LoadError, check_tensor_parallel
from engine.quantization import FP8Config
from engine.sampling_params import SamplingParams
from tests.tiny_models import build_checkpoint, falcon_h1_config, falcon_mamba_config

MODELS = {
    "h1": lambda: falcon_h1_config(),  # 2 Mamba groups, 2 KV heads: one each per rank
    "h1_replicated": lambda: falcon_h1_config(mamba_n_groups=1, num_key_value_heads=1),  # fewer than the ranks
    "mamba_tied": lambda: falcon_mamba_config(tie_word_embeddings=True),
}
# Small pools and token budget: long prompts are chunked and sequences are preempted.
ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=24, kv_block_size=4,
              num_kv_blocks=24, max_model_len=96)
SHARED = list(range(10, 42))  # a 32-token prefix shared by the later requests: they hit the prefix cache


def workload(llm: LLM) -> list:
    greedy = SamplingParams(max_tokens=10, temperature=0, logprobs=2)
    scored = SamplingParams(max_tokens=4, temperature=0, logprobs=1, prompt_logprobs=2)
    first = llm.generate([SHARED + [50, 51], list(range(60, 100)), [7, 8, 9], [3] * 30, list(range(100, 130))],
                         [greedy, greedy, dataclasses.replace(greedy, n=2), greedy, scored], use_tqdm=False)
    # One at a time: the first reveals the shared prefix (a checkpoint at its end), the next ones hit it.
    short = SamplingParams(max_tokens=4, temperature=0, logprobs=1)
    return first + [llm.generate([SHARED + tail], short, use_tqdm=False)[0] for tail in ([70], [71, 72], [73])]


def summary(outputs: list) -> list:
    return [(o.num_cached_tokens, [(c.token_ids, [lp[t] for lp, t in zip(c.logprobs, c.token_ids)])
                                   for c in o.outputs],
             [[(t, lp.logprob) for t, lp in entry.items()] for entry in o.prompt_logprobs[1:]]
             if o.prompt_logprobs else None)
            for o in outputs]


def assert_same(tp1: list, tp2: list) -> None:
    assert len(tp1) == len(tp2)
    for (cached1, samples1, prompt1), (cached2, samples2, prompt2) in zip(tp1, tp2):
        assert cached1 == cached2
        for (tokens1, lps1), (tokens2, lps2) in zip(samples1, samples2, strict=True):
            assert tokens1 == tokens2
            assert lps1 == pytest.approx(lps2, abs=1e-4)
        assert (prompt1 is None) == (prompt2 is None)
        for entry1, entry2 in zip(prompt1 or [], prompt2 or [], strict=True):
            assert [t for t, _ in entry1] == [t for t, _ in entry2]
            assert [lp for _, lp in entry1] == pytest.approx([lp for _, lp in entry2], abs=1e-4)


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """The same workload on 1 rank and on 2 (the latter's engine left open for the tests)."""
    directory = build_checkpoint(tmp_path_factory.mktemp(request.param), MODELS[request.param]())
    single = LLM(str(directory), **ENGINE)
    expected, single_stats = summary(workload(single)), single.engine.stats()
    llm = LLM(str(directory), tensor_parallel_size=2, **ENGINE)
    workers = llm.engine.runner.workers.processes
    yield request.param, expected, single_stats, llm, workers
    llm.engine.close()
    assert not any(p.is_alive() for p in workers)


def test_two_ranks_match_one(pair) -> None:
    name, expected, single_stats, llm, _ = pair
    got = summary(workload(llm))
    assert_same(expected, got)
    stats = llm.engine.stats()
    assert stats.num_preemptions == single_stats.num_preemptions
    if name.startswith("h1"):
        assert stats.num_preemptions > 0  # KV blocks ran out: the preempted sequences recomputed
    assert got[-1][0] >= len(SHARED) - ENGINE["kv_block_size"]  # the last request started from the cached prefix
    assert llm.engine.cache.slots.num_free == llm.engine.cache.slots.capacity


def test_a_dead_worker_kills_the_engine(pair) -> None:
    """Runs last on each pair: the engine reports the lost worker even while idle, and refuses to step."""
    _, _, _, llm, workers = pair
    workers[0].kill()
    workers[0].join()
    deadline = time.monotonic() + 5
    while llm.engine.dead_reason is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tensor-parallel worker rank 1" in llm.engine.dead_reason and "exited with code -9" in llm.engine.dead_reason
    with pytest.raises(EngineDeadError, match="worker rank 1"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_rank_units_deal_heads_and_replicate_groups() -> None:
    assert [rank_units(8, TensorParallel(r, 4)) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6),
                                                                     range(6, 8)]
    assert [rank_units(2, TensorParallel(r, 4)) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2),
                                                                     range(1, 2)]


def test_sizes_the_model_cannot_be_split_by(h1_dir, mamba_dir) -> None:
    arch, cfg = load_model_config(h1_dir)  # 4 attention heads, 2 KV heads, 8 Mamba heads, 2 groups
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by 3"):
        check_tensor_parallel(arch, cfg, 3)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by 8"):
        check_tensor_parallel(arch, cfg, 8)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) is not divisible by 2"):
        check_tensor_parallel(arch, dataclasses.replace(cfg, num_attention_heads=6, num_key_value_heads=3), 2)
    with pytest.raises(ValueError, match=r"mamba_n_groups \(3\)"):
        check_tensor_parallel(arch, dataclasses.replace(cfg, mamba_n_heads=6, mamba_n_groups=3), 2)
    with pytest.raises(ValueError, match=r"intermediate_size \(97\)"):
        check_tensor_parallel(arch, dataclasses.replace(cfg, intermediate_size=97), 2)
    with pytest.raises(LoadError, match="fp8-quantized weights cannot be split"):
        check_tensor_parallel(arch, dataclasses.replace(cfg, quantization=FP8Config()), 2)
    check_tensor_parallel(arch, cfg, 2)
    arch, cfg = load_model_config(mamba_dir)  # d_inner 80
    with pytest.raises(ValueError, match=r"intermediate_size \(d_inner, 80\) is not divisible by 3"):
        check_tensor_parallel(arch, cfg, 3)
    check_tensor_parallel(arch, cfg, 4)
