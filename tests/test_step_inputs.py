"""A step's inputs, packed on the host and moved in one copy: the eager flat batch (ModelRunner.prepare) and
the decode graphs' buffers (engine/cuda_graphs.py, with a stand-in for the captured graph): what the
kernels read is what the sequences say, in 16-byte aligned tensors (Triton specializes on alignment)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.cuda_graphs import DecodeGraphs
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from kernels import PAD_SLOT


class RecordingGraph:
    """Stands in for a captured graph: copies the bucket's inputs when replayed."""

    def __init__(self, graphs: DecodeGraphs, b: int):
        self.graphs, self.b, self.seen = graphs, b, []

    def replay(self) -> None:
        batch = self.graphs.batch(self.b)
        batch.lora_slots = self.graphs._fields(self.graphs.inputs, self.b)["lora_slots"]  # what the LoRA layers read
        self.seen.append({name: getattr(batch, name).clone() for name in
                          ("input_ids", "positions", "slot_mapping", "seq_lens", "state_slots", "lora_slots",
                           "block_tables")})


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
        loras = [rng.choice([PAD_SLOT, 0, 3]) for _ in range(n)]
        logits = graphs.run(ids, positions, slots, tables, loras)
        b = next(size for size in graphs.buckets if size >= n)
        assert torch.equal(logits, graphs.logits[b][:n])
        seen = graphs.graphs[b].seen[-1]
        pad = b - n
        assert seen["input_ids"].tolist() == ids + [0] * pad
        assert seen["positions"].tolist() == positions + [0] * pad
        assert seen["seq_lens"].tolist() == [p + 1 for p in positions] + [0] * pad
        assert seen["state_slots"].tolist() == slots + [PAD_SLOT] * pad
        assert seen["lora_slots"].tolist() == loras + [PAD_SLOT] * pad
        kv_slots = [t[p // 16] * 16 + p % 16 for t, p in zip(tables, positions)]
        assert seen["slot_mapping"].tolist() == kv_slots + [-1] * pad
        for row, table in zip(seen["block_tables"].tolist(), tables):
            assert row[: len(table)] == table
        assert seen["input_ids"].dtype == torch.long and seen["state_slots"].dtype == torch.int32


def test_pure_ssm_rows_write_no_kv():
    graphs = _graphs(max_num_seqs=4, block_size=0)
    graphs.run([7, 8, 9], [4, 5, 6], [0, 1, 2], [[], [], []], [PAD_SLOT] * 3)
    seen = graphs.graphs[4].seen[-1]
    assert seen["slot_mapping"].tolist() == [-1] * 4
    assert seen["state_slots"].tolist() == [0, 1, 2, PAD_SLOT]


class CpuRunner:
    """What ModelRunner.prepare reads of its runner."""

    def __init__(self, block_size: int):
        self.block_size, self.device = block_size, torch.device("cpu")


def _sequence(rng: random.Random, prompt_len: int, computed: int, new: int, logprobs: bool = False) -> Sequence:
    seq = Sequence("r", 0, [rng.randrange(300) for _ in range(prompt_len)],
                   SamplingParams(max_tokens=4, prompt_logprobs=1 if logprobs else None))
    seq.num_computed_tokens = computed
    seq.block_table = rng.sample(range(500), -(-(computed + new) // 4))
    seq.state_slot = rng.randrange(16)
    return seq


@pytest.mark.parametrize("block_size", [4, 0])
def test_the_eager_batch_says_what_its_sequences_say(block_size):
    rng = random.Random(1)
    # Three decodes, a first chunk, a middle chunk, a last chunk with prompt logprobs: 29 tokens, odd, so
    # the fields after input_ids are aligned only if the packing pads them.
    news = [1, 1, 1, 7, 13, 6]
    seqs = [_sequence(rng, 9, 8, 1), _sequence(rng, 20, 19, 1), _sequence(rng, 3, 2, 1), _sequence(rng, 7, 0, 7),
            _sequence(rng, 40, 13, 13), _sequence(rng, 31, 25, 6, logprobs=True)]
    for seq in seqs[:3]:  # decodes: their last token is an output token
        seq.num_prompt_tokens -= 1
    assert ModelRunner.prepare(CpuRunner(block_size), ScheduledBatch(seqs, news, num_decodes=3)).lora_slots is None
    seqs[1].lora_slot, seqs[4].lora_slot = 2, 0  # LoRA adapters' slots: one per token
    batch = ModelRunner.prepare(CpuRunner(block_size), ScheduledBatch(seqs, news, num_decodes=3))
    assert batch.lora_slots.tolist() == [s.lora_slot for s, n in zip(seqs, news) for _ in range(n)]
    starts = [s.num_computed_tokens for s in seqs]
    assert batch.input_ids.tolist() == [t for s, a, n in zip(seqs, starts, news) for t in s.token_ids[a: a + n]]
    assert batch.positions.tolist() == [p for a, n in zip(starts, news) for p in range(a, a + n)]
    kv = [s.block_table[p // block_size] * block_size + p % block_size if block_size else PAD_SLOT
          for s, a, n in zip(seqs, starts, news) for p in range(a, a + n)]
    assert batch.slot_mapping.tolist() == kv
    ends = [sum(news[: i + 1]) for i in range(len(news))]
    assert batch.query_start_loc.tolist() == [0] + ends
    assert batch.seq_lens.tolist() == [a + n for a, n in zip(starts, news)]
    assert batch.state_slots.tolist() == [s.state_slot for s in seqs]
    assert batch.has_initial_state.tolist() == [a > 0 for a in starts]
    for row, seq in zip(batch.block_tables.tolist(), seqs):
        assert row[: len(seq.block_table)] == seq.block_table
    scored = list(range(ends[4], ends[4] + 5))  # positions 25..29 of the last sequence score tokens 26..30
    assert batch.logits_indices.tolist() == [ends[0] - 1, ends[1] - 1, ends[2] - 1, ends[3] - 1, ends[5] - 1] + scored
    assert (batch.num_decodes, batch.max_query_len, batch.max_seq_len) == (3, 13, 31)
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices", "query_start_loc", "seq_lens",
                 "state_slots", "block_tables", "lora_slots"):
        tensor = getattr(batch, name)
        assert tensor.data_ptr() % 16 == 0, name
        assert tensor.dtype == (torch.long if name in ("input_ids", "positions", "slot_mapping", "logits_indices")
                                else torch.int32), name
