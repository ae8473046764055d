"""Decode-only steps replayed from CUDA graphs captured at bucketed batch sizes (1, 2, 4, 8, 16, 24, ...).

A step of n decodes replays the smallest bucket b >= n. Its inputs live in static buffers; rows n..b-1
are padding: state slot PAD_SLOT and KV slot -1 (the kernels skip them) and seq_len 0, so they never
touch a real sequence's state or cache. Attention is sized for max_model_len, the longest any row gets.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.cache_pools import LayerCache
from engine.forward_batch import ForwardBatch
from kernels import PAD_SLOT

logger = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, caches: list[LayerCache], max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device):
        self.model, self.caches, self.max_model_len = model, caches, max_model_len
        self.block_size = block_size
        self.buckets = bucket_sizes(max_num_seqs)
        n, width = self.buckets[-1], max(-(-max_model_len // max(block_size, 1)), 1)
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.long, device=device)
        # Rows of two tensors, so a step's inputs arrive in two copies (plus the block tables).
        self.longs = torch.zeros(3, n, **i64)
        self.input_ids, self.positions, self.slot_mapping = self.longs
        self.ints = torch.zeros(2, n, **i32)
        self.seq_lens, self.state_slots = self.ints
        self.state_slots.fill_(PAD_SLOT)
        self.slot_mapping.fill_(-1)
        self.block_tables = torch.zeros(n, width, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.has_initial_state = torch.ones(n, dtype=torch.bool, device=device)
        self.logits_indices = torch.arange(n, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b], state_slots=self.state_slots[:b], has_initial_state=self.has_initial_state[:b],
            block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
            logits_indices=self.logits_indices[:b], num_decodes=b, max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            batch = self.batch(b)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: all rows are padding, nothing is written
                for _ in range(2):
                    self.model.compute_logits(self.model(batch, self.caches))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self.model.compute_logits(self.model(batch, self.caches))
            self.graphs[b] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.buckets,
                    time.perf_counter() - start)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], state_slots: list[int], block_tables: list[list[int]]
            ) -> torch.Tensor:
        """Replays the graph for these decode rows; returns their logits [n, V]."""
        n = len(input_ids)
        b = next(size for size in self.buckets if size >= n)
        pad = b - n
        bs = self.block_size
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)] if bs else [-1] * n
        self.longs[:, :b].copy_(torch.tensor([input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad]))
        self.ints[:, :b].copy_(torch.tensor([[p + 1 for p in positions] + [0] * pad,
                                             state_slots + [PAD_SLOT] * pad], dtype=torch.int32))
        if bs:
            width = max(len(t) for t in block_tables)
            rows = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
            self.block_tables[:n, :width].copy_(rows, non_blocking=True)
        self.graphs[b].replay()
        return self.logits[b][:n]
