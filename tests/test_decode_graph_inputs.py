"""The decode graphs' inputs, staged in one buffer per bucket and moved with one copy (engine/cuda_graphs.py),
checked on the CPU with a stand-in for the captured graph: what a replay would read is what the rows say."""

from __future__ import annotations

import random

import torch

from engine.cuda_graphs import DecodeGraphs
from kernels import PAD_SLOT


class RecordingGraph:
    """Stands in for a captured graph: copies the bucket's inputs when replayed."""

    def __init__(self, graphs: DecodeGraphs, b: int):
        self.graphs, self.b, self.seen = graphs, b, []

    def replay(self) -> None:
        batch = self.graphs.batch(self.b)
        self.seen.append({name: getattr(batch, name).clone() for name in
                          ("input_ids", "positions", "slot_mapping", "seq_lens", "state_slots", "block_tables")})


def _graphs(max_num_seqs: int, block_size: int) -> DecodeGraphs:
    graphs = DecodeGraphs(None, [], max_num_seqs, max_model_len=256, block_size=block_size,
                          device=torch.device("cpu"))
    for b in graphs.buckets:
        graphs.graphs[b] = RecordingGraph(graphs, b)
        graphs.logits[b] = torch.arange(b * 3, dtype=torch.float32).view(b, 3)
    return graphs


def test_each_bucket_reads_its_rows_then_padding():
    rng = random.Random(0)
    graphs = _graphs(max_num_seqs=24, block_size=16)
    for n in (1, 3, 9, 17, 24, 5, 2):  # growing and shrinking, so stale rows of a larger step must not leak
        positions = [rng.randrange(0, 250) for _ in range(n)]
        tables = [rng.sample(range(1000), min(p // 16 + 1 + rng.randrange(2), 16)) for p in positions]
        ids, slots = [rng.randrange(300) for _ in range(n)], rng.sample(range(64), n)
        logits = graphs.run(ids, positions, slots, tables)
        b = next(size for size in graphs.buckets if size >= n)
        assert torch.equal(logits, graphs.logits[b][:n])
        seen = graphs.graphs[b].seen[-1]
        pad = b - n
        assert seen["input_ids"].tolist() == ids + [0] * pad
        assert seen["positions"].tolist() == positions + [0] * pad
        assert seen["seq_lens"].tolist() == [p + 1 for p in positions] + [0] * pad
        assert seen["state_slots"].tolist() == slots + [PAD_SLOT] * pad
        kv_slots = [t[p // 16] * 16 + p % 16 for t, p in zip(tables, positions)]
        assert seen["slot_mapping"].tolist() == kv_slots + [-1] * pad
        for row, table in zip(seen["block_tables"].tolist(), tables):
            assert row[: len(table)] == table
        assert seen["input_ids"].dtype == torch.long and seen["state_slots"].dtype == torch.int32


def test_pure_ssm_rows_write_no_kv():
    graphs = _graphs(max_num_seqs=4, block_size=0)
    graphs.run([7, 8, 9], [4, 5, 6], [0, 1, 2], [[], [], []])
    seen = graphs.graphs[4].seen[-1]
    assert seen["slot_mapping"].tolist() == [-1] * 4
    assert seen["state_slots"].tolist() == [0, 1, 2, PAD_SLOT]
