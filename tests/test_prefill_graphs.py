"""Prefill graphs (engine/prefill_graphs.py) on CPU: the padded forward a graph captures, run eagerly over the
static buffers at several bucket paddings, against the normal flat forward. fp32: the same tokens, the same
logprobs and afterwards the same SSM/conv states and KV cache (to GEMM rounding), so padding touched no state
row or KV block.
With the Triton kernels (interpreted) too, since they are what the graphs replay on a GPU; the replay itself
is tested in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.prefill_graphs import PrefillGraphs, prefill_buckets
from tests.tiny_models import GPU_TEST_MEMORY

MAX_TOKENS = 96  # buckets 64 and 96


def test_buckets_cover_every_count_up_to_the_budget():
    assert prefill_buckets(8192) == [64, 128, 256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]
    assert prefill_buckets(1000) == [64, 128, 256, 512, 1000]
    assert prefill_buckets(96) == [64, 96]
    assert prefill_buckets(24) == [24]


def _engine(directory, padded: bool) -> tuple[LLM, list[int]]:
    """An fp32 CPU engine; with padded, its prefill-only steps that fit run PrefillGraphs' padded forward.
    Returns it and the list of the buckets those steps used."""
    llm = LLM(str(directory), device="cpu", dtype="float32", max_num_seqs=6, max_num_batched_tokens=MAX_TOKENS,
              max_model_len=256, kv_block_size=16, enable_prefix_caching=True)
    used = []
    if padded:
        runner = llm.engine.runner
        graphs = PrefillGraphs(runner.model, runner.caches, MAX_TOKENS, 256, runner.block_size, runner.device)
        load = graphs.load

        def recording_load(batch, num_samplers):
            used.append((load(batch, num_samplers), batch.B, bool(batch.staged[batch.num_longs:][
                batch.int_bounds[3][0]: batch.int_bounds[3][1]].any())))
            return used[-1][0]

        graphs.load = recording_load
        runner.prefill_graphs = graphs
    return llm, used


def _workload(llm: LLM, max_tokens: int, num_rounds: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=5)
    shared = [5 + (7 * j) % 240 for j in range(40)]
    rounds = [
        [[5 + (11 * i + 5 * j) % 250 for j in range(3 + 9 * i)] for i in range(4)],  # 4 sequences, one bucket
        [[9 + (3 * j) % 200 for j in range(110)]],  # chunked: 96 then 14 tokens with the state carried over
        [shared + [17, 18, 19], shared + [21] * 30],  # a branch-point checkpoint, then cached context
        [shared + [23, 24]],  # a prefix-cache hit: 8 new tokens after cached blocks and a state checkpoint
        [[30 + j % 50 for j in range(10 + i)] for i in range(6)],  # 6 sequences: more than a graph holds
    ]
    return [out for prompts in rounds[:num_rounds] for out in llm.generate(prompts, params)]


def _caches(llm: LLM) -> list[torch.Tensor]:
    return [t for c in llm.engine.runner.caches for t in (c.conv_state, c.ssm_state, c.k_cache, c.v_cache)
            if t is not None]


@pytest.mark.parametrize("triton_kernels", [False, True], ids=["torch-ops", "triton-interpreted"])
@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_padded_prefill_equals_the_flat_forward(request, monkeypatch, fixture, triton_kernels):
    if triton_kernels:  # the kernels on CPU tensors, through Triton's interpreter (tests/conftest.py)
        from engine import ops
        monkeypatch.setattr(ops, "_impl", lambda module, name, x: getattr(module, name, None)
                            or getattr(module, name + "_ref"))
    directory = request.getfixturevalue(fixture)
    (eager, _), (padded, used) = _engine(directory, False), _engine(directory, True)
    # The interpreter is slow: there, one decode step after each prefill, and the first two rounds (several
    # sequences, a carried state); the prefix-cache rounds run with the torch ops.
    work = (2, 2) if triton_kernels else (6, 5)
    for a, b in zip(_workload(eager, *work), _workload(padded, *work), strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < 1e-5
    # Padding writes nothing: a padded row's KV or state would differ by O(1). Not bitwise: the CPU GEMM's
    # rounding depends on the row count (1-ulp differences in some K/V rows), as logprobs do within 1e-5.
    for a, b in zip(_caches(eager), _caches(padded), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    buckets = {Tb for Tb, _, _ in used}
    assert buckets == {64, 96}  # both paddings ran
    assert any(B == 4 for _, B, _ in used) and any(init for *_, init in used)  # several sequences; carried state
    assert all(B <= 4 for _, B, _ in used)  # 6 sequences go eager


class CountingGraph:
    """A captured prefill graph that records its replays."""

    def __init__(self, graph, replays: list[int], Tb: int):
        self.graph, self.replays, self.Tb = graph, replays, Tb

    def replay(self) -> None:
        self.replays.append(self.Tb)
        self.graph.replay()


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_prefill_graph_replays_equal_eager(request, fixture):
    """On the GPU: the captured prefill graphs (Triton kernels) against the eager flat forward, fp32."""
    directory = request.getfixturevalue(fixture)
    kw = dict(device="cuda", dtype="float32", max_num_seqs=6, max_num_batched_tokens=MAX_TOKENS, max_model_len=256,
              kv_block_size=16, gpu_memory_utilization=GPU_TEST_MEMORY, num_kv_blocks=1024,
              prefix_cache_checkpoints=64)  # the same pool sizes in both engines, to compare them
    graphs, eager = LLM(str(directory), **kw), LLM(str(directory), enforce_eager=True, **kw)
    prefill_graphs = graphs.engine.runner.prefill_graphs
    assert sorted(prefill_graphs.graphs) == [64, 96] and eager.engine.runner.prefill_graphs is None
    replays = []
    prefill_graphs.graphs = {Tb: CountingGraph(g, replays, Tb) for Tb, g in prefill_graphs.graphs.items()}
    for a, b in zip(_workload(eager, 6, 5), _workload(graphs, 6, 5), strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert max(abs(la[t] - lb[t]) for t in la.keys() & lb.keys()) < 1e-4
    for a, b in zip(_caches(eager), _caches(graphs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert set(replays) == {64, 96}


@pytest.mark.gpu
def test_prefill_graphs_bf16_match_eager_first_token(h1_dir):
    """bf16, three sequences in one 512-token bucket: the first token's top logprobs of graph and eager
    prefill agree to bf16 rounding."""
    kw = dict(device="cuda", dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512,
              gpu_memory_utilization=GPU_TEST_MEMORY)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    prompts = [[5 + (13 * j) % 240 for j in range(n)] for n in (7, 100, 300)]
    outs = [LLM(str(h1_dir), enforce_eager=e, **kw).generate(prompts, params) for e in (False, True)]
    for a, b in zip(*outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert max(abs(la[t] - lb[t]) for t in la.keys() & lb.keys()) < 0.05
