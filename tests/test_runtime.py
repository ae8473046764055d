"""Pieces of the GPU runtime that are plain logic: graph buckets and the cache plan."""

from engine import LLM
from engine.cuda_graphs import bucket_sizes


def test_bucket_sizes_cover_every_batch():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = bucket_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256
    assert all(b - a <= 8 for a, b in zip(sizes, sizes[1:]))


def test_cpu_plan_gives_every_sequence_max_model_len(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="float32", max_num_seqs=5, max_model_len=100, kv_block_size=8)
    runner = llm.engine.runner
    assert runner.num_slots == 5 and runner.num_blocks == 5 * 13
    assert runner.num_checkpoints == 5  # the prefix cache's state checkpoints: max_num_seqs on CPU
    assert runner.caches[0].k_cache.shape == (65, 8, 2, 24) and runner.caches[0].ssm_state.shape == (10, 8, 8, 16)
    assert runner.graphs is None


def test_pure_ssm_has_no_kv_cache(mamba_dir):
    runner = LLM(str(mamba_dir), device="cpu", dtype="float32", max_num_seqs=3).engine.runner
    assert runner.num_blocks == 0 and runner.caches[0].k_cache is None
