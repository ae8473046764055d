"""Decode-only steps replayed from CUDA graphs captured at bucketed batch sizes (1, 2, 4, 8, 16, 24, ...).

A step of n decodes replays the smallest bucket b >= n. Its inputs live in static buffers; rows n..b-1
are padding: state slot PAD_SLOT and KV slot -1 (the kernels skip them) and seq_len 0, so they never
touch a real sequence's state or cache. Attention is sized for max_model_len, the longest any row gets.

A step moves its inputs in one host-to-device copy from a pinned mirror: bucket b's row fields (laid
out for b, where its graph reads them), then the n rows' block tables packed to their widest row,
which one device copy spreads into the graphs' [max_num_seqs, max_blocks] table.

With LoRA the graphs always run the adapter kernels over the fixed-size stacks, reading each row's
adapter slot from the static inputs (PAD_SLOT: none), so they hold for any set of loaded adapters.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from engine.cache_pools import LayerCache
from engine.forward_batch import ForwardBatch
from engine.lora.layers import LoRAContext
from engine.sampled_tokens import SampledTokens
from kernels import PAD_SLOT

logger = logging.getLogger(__name__)


def capture_graph(forward, pool, tp_size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """forward() captured in a CUDA graph (after two warm-up runs on a side stream, which compile its
    kernels), and the graph's output tensor."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # Tensor parallelism: the NCCL all-reduces are captured; NCCL's watchdog thread keeps querying events
    # meanwhile, which a global capture would count as an error.
    mode = "thread_local" if tp_size > 1 else "global"
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
        out = forward()
    return graph, out


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


# The per-row inputs a step writes, with the value of a padding row (whose state and KV writes are skipped).
ROW_FIELDS = {"input_ids": (torch.long, 0), "positions": (torch.long, 0), "slot_mapping": (torch.long, -1),
              "seq_lens": (torch.int32, 0), "state_slots": (torch.int32, PAD_SLOT),
              "lora_slots": (torch.int32, PAD_SLOT)}  # each row's LoRA adapter slot (engine.lora)


def _field_offsets(b: int) -> tuple[dict[str, int], int]:
    """Byte offset of each row field of bucket b (16-byte aligned), and where the packed block tables start."""
    offsets, at = {}, 0
    for name, (dtype, _) in ROW_FIELDS.items():
        offsets[name] = at
        at += -(-b * dtype.itemsize // 16) * 16
    return offsets, at


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, caches: list[LayerCache], max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, lora_context: LoRAContext | None = None):
        self.model, self.caches, self.max_model_len = model, caches, max_model_len
        self.lora_context = lora_context
        self.block_size = block_size
        self.buckets = bucket_sizes(max_num_seqs)
        n, self.width = self.buckets[-1], max(-(-max_model_len // max(block_size, 1)), 1)
        size = _field_offsets(n)[1] + n * self.width * 4
        self.inputs = torch.zeros(size, dtype=torch.uint8, device=device)
        self.host_inputs = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.host_bytes = self.host_inputs.numpy()
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # the host mirror may be rewritten
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, self.width, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.has_initial_state = torch.ones(n, dtype=torch.bool, device=device)
        self.logits_indices = torch.arange(n, **i64)
        self.host_fields = {b: {name: t.numpy() for name, t in self._fields(self.host_inputs, b).items()}
                            for b in self.buckets}
        self.device_fields = {b: self._fields(self.inputs, b) for b in self.buckets}
        self.tables_at = {b: _field_offsets(b)[1] for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _fields(self, buffer: torch.Tensor, b: int) -> dict[str, torch.Tensor]:
        """Bucket b's row fields inside `buffer` (the device inputs or their host mirror)."""
        offsets, _ = _field_offsets(b)
        return {name: buffer[offsets[name]: offsets[name] + b * dtype.itemsize].view(dtype)
                for name, (dtype, _) in ROW_FIELDS.items()}

    def batch(self, b: int) -> ForwardBatch:
        v = self._fields(self.inputs, b)
        return ForwardBatch(
            input_ids=v["input_ids"], positions=v["positions"], query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=v["seq_lens"], state_slots=v["state_slots"], has_initial_state=self.has_initial_state[:b],
            block_tables=self.block_tables[:b], slot_mapping=v["slot_mapping"],
            logits_indices=self.logits_indices[:b], num_decodes=b, max_query_len=1, max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """Captures every bucket, largest first, so smaller graphs reuse its memory in `pool`."""
        start = time.perf_counter()
        for b in reversed(self.buckets):
            self._write_padding(b, 0)  # all rows are padding: warm-up and capture write nothing
            self.inputs.copy_(self.host_inputs)
            batch = self.batch(b)
            if self.lora_context is not None:
                self.lora_context.row_slots = self._fields(self.inputs, b)["lora_slots"]
            self.graphs[b], self.logits[b] = capture_graph(
                lambda batch=batch: self.model.compute_logits(self.model(batch, self.caches)), pool, self.model.tp.size)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.buckets,
                    time.perf_counter() - start)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def _write_padding(self, b: int, n: int) -> dict[str, np.ndarray]:
        """Bucket b's row fields in the host mirror, rows n..b-1 set to padding."""
        fields = self.host_fields[b]
        for name, (_, pad) in ROW_FIELDS.items():
            fields[name][n:] = pad
        return fields

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], state_slots: list[int], block_tables: list[list[int]],
            lora_slots: list[int], sampled: SampledTokens | None = None) -> torch.Tensor:
        """Replays the graph for these decode rows; returns their logits [n, V]. sampled: the rows' input
        tokens are on the device (input_ids are placeholders)."""
        n = len(input_ids)
        b = next(size for size in self.buckets if size >= n)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has read the mirror
        v = self._write_padding(b, n)
        v["input_ids"][:n] = input_ids
        pos = v["positions"][:n]
        pos[:] = positions
        v["seq_lens"][:n] = pos + 1
        v["state_slots"][:n] = state_slots
        v["lora_slots"][:n] = lora_slots
        size = tables_at = self.tables_at[b]
        bs, width = self.block_size, 0
        if bs:
            lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=n)
            width = int(lens.max())
            size += n * width * 4
            tables = self.host_bytes[tables_at: size].view(np.int32).reshape(n, width)
            tables[...] = 0
            tables[np.arange(width)[None, :] < lens[:, None]] = np.fromiter(
                itertools.chain.from_iterable(block_tables), dtype=np.int32, count=int(lens.sum()))
            v["slot_mapping"][:n] = tables[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        else:
            v["slot_mapping"][:n] = -1
        self.inputs[:size].copy_(self.host_inputs[:size], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if width:
            self.block_tables[:n, :width].copy_(self.inputs[tables_at: size].view(torch.int32).view(n, width))
        if sampled is not None:
            v = self.device_fields[b]
            sampled.write_inputs(v["input_ids"][:n], v["state_slots"][:n], v["slot_mapping"][:n], v["seq_lens"][:n])
        self.graphs[b].replay()
        return self.logits[b][:n]
