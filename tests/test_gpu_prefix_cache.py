"""The prefix cache on a CUDA device (skipped without one): with CUDA graphs, in float32 and bfloat16,
outputs with the cache on equal those with it off (a resumed chunked scan is the same math)."""

import pytest

from engine import LLM, SamplingParams
from tests.tiny_models import GPU_TEST_MEMORY

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_on_equals_off_with_cuda_graphs(request, fixture, dtype):
    directory = request.getfixturevalue(fixture)
    args = dict(device="cuda", dtype=dtype, max_num_seqs=4, kv_block_size=16, gpu_memory_utilization=GPU_TEST_MEMORY)
    on = LLM(str(directory), prefix_cache_checkpoints=8, **args)
    off = LLM(str(directory), enable_prefix_caching=False, **args)
    assert on.engine.runner.graphs is not None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    system = [7 + i % 200 for i in range(70)]
    prompt, cached = [], 0
    for turn in range(4):  # a chat resent whole, then requests sharing a system prompt
        prompt = prompt + [20 + 3 * turn + j for j in range(9)]
        got, want = on.generate([prompt], params)[0], off.generate([prompt], params)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        cached += got.num_cached_tokens
        prompt = prompt + got.outputs[0].token_ids
    for j in range(4):
        got, want = (llm.generate([system + [100 + j, 5]], params)[0] for llm in (on, off))
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        cached += got.num_cached_tokens
    assert cached > 0
