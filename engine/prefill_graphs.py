"""Prefill-only steps replayed from CUDA graphs captured at bucketed token counts (64, 128, 256, 512, 1024,
1536, ..., 4096).

A short prefill is bound by the host: its ~800 kernel launches take longer to enqueue than the GPU takes to
run them. A step of T new tokens over B <= PREFILL_GRAPH_SEQS sequences (no decode rows, no prompt logprobs,
no LoRA adapter) replays the smallest bucket Tb >= T. Every input a kernel reads lives in one static device
buffer, filled by one host-to-device copy: tokens T..Tb-1 and sequences B..PREFILL_GRAPH_SEQS-1 are padding.
Padding tokens belong to no sequence (the padded sequences are empty, starting at T) and write no KV
(slot -1); padded sequences have state slot PAD_SLOT, so no kernel touches a state row for them. The
kernels size their grids from the bucket (tokens, sequences, max query length) and read the real bounds from
query_start_loc on the device. Cached context (prefix-cache hits, later chunks of a long prompt) comes from
seq_lens, block_tables and has_initial_state, so those steps replay too.

forward(Tb) is what a graph captures; on a CPU it runs eagerly over the same padded buffers (the tests).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from engine.cache_pools import LayerCache
from engine.cuda_graphs import capture_graph
from engine.forward_batch import ForwardBatch
from engine.staged_batch import StagedBatch
from kernels import PAD_SLOT

logger = logging.getLogger(__name__)

PREFILL_GRAPH_SEQS = 4  # sequences a prefill graph holds: padded ones cost only early-exit programs
PREFILL_GRAPH_MAX_TOKENS = 4096  # past this the step's kernels outlast its launches: eager is as fast


def prefill_buckets(max_num_batched_tokens: int) -> list[int]:
    """Token counts to capture: 64, 128, 256, 512, then every 512, up to min(4096, max_num_batched_tokens)
    included (a step pads to at most twice its tokens, and to a third more past 1,024)."""
    cap = min(PREFILL_GRAPH_MAX_TOKENS, max_num_batched_tokens)
    sizes = [b for b in (64, 128, 256) if b < cap] + list(range(512, cap, 512))
    return sizes + [cap]


def _layout(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    """Offset of each field (in elements, multiples of 4 so the int32 views are 16-byte aligned) and the total."""
    offsets, at = {}, 0
    for name, n in sizes.items():
        offsets[name] = at
        at += -(-n // 4) * 4
    return offsets, at


class PrefillGraphs:
    def __init__(self, model: torch.nn.Module, caches: list[LayerCache], max_num_batched_tokens: int,
                 max_model_len: int, block_size: int, device: torch.device, max_seqs: int = PREFILL_GRAPH_SEQS):
        self.model, self.caches, self.max_model_len, self.device = model, caches, max_model_len, device
        self.buckets = prefill_buckets(max_num_batched_tokens)
        self.max_seqs = S = max_seqs
        T = self.buckets[-1]
        self.width = max(-(-max_model_len // max(block_size, 1)), 1)
        # int64 fields, then the int32 ones (kept as int64 on the host, cast on the device inside the graph).
        self.long_at, num_longs = _layout({"input_ids": T, "positions": T, "slot_mapping": T, "logits_indices": S})
        int_at, num_ints = _layout({"query_start_loc": S + 1, "seq_lens": S, "state_slots": S,
                                    "has_initial_state": S, "block_tables": S * self.width})
        self.int_at = {name: num_longs + at for name, at in int_at.items()}
        self.num_longs = num_longs
        size = num_longs + num_ints
        self.inputs = torch.zeros(size, dtype=torch.long, device=device)
        self.host_inputs = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.host = self.host_inputs.numpy()
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # the host mirror may be rewritten
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, batch: StagedBatch, num_samplers: int) -> bool:
        """Whether a step may replay: prefill rows only, few sequences, no LoRA rows, no prompt scores."""
        T = batch.long_bounds[0][1] - batch.long_bounds[0][0]
        lora_a, lora_b = batch.int_bounds[4]
        scores = batch.long_bounds[3][1] - batch.long_bounds[3][0] - num_samplers
        return (batch.num_decodes == 0 and bool(self.buckets) and 0 < T <= self.buckets[-1] and batch.B <= self.max_seqs
                and batch.width <= self.width and lora_a == lora_b and scores == 0)

    def batch(self, Tb: int) -> ForwardBatch:
        """Bucket Tb's flat batch over the static inputs (the int32 fields cast here, inside the graph)."""
        buf, at, S = self.inputs, self.long_at, self.max_seqs
        ints = buf[self.num_longs:].to(torch.int32)

        def field(name, n):
            start = self.int_at[name] - self.num_longs
            return ints[start: start + n]

        return ForwardBatch(
            input_ids=buf[at["input_ids"]: at["input_ids"] + Tb], positions=buf[at["positions"]: at["positions"] + Tb],
            query_start_loc=field("query_start_loc", S + 1), seq_lens=field("seq_lens", S),
            state_slots=field("state_slots", S), has_initial_state=field("has_initial_state", S).bool(),
            block_tables=field("block_tables", S * self.width).view(S, self.width),
            slot_mapping=buf[at["slot_mapping"]: at["slot_mapping"] + Tb],
            logits_indices=buf[at["logits_indices"]: at["logits_indices"] + S],
            num_decodes=0, max_query_len=Tb, max_seq_len=self.max_model_len)

    def forward(self, Tb: int) -> torch.Tensor:
        """What a graph captures: the logits [max_seqs, V] of the rows in the static logits_indices."""
        return self.model.compute_logits(self.model(self.batch(Tb), self.caches))

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """Captures every bucket, largest first, into the decode graphs' memory pool; then keeps only the
        buckets whose replay takes no longer than an eager forward takes to enqueue (an eager step costs at
        least that), so a graph never makes a step slower by its padding."""
        start = time.perf_counter()
        self._write_padding(self.buckets[-1], 0, 0)  # all padding: warm-up and capture write no state, no KV
        self.inputs.copy_(self.host_inputs)
        for Tb in reversed(self.buckets):
            forward = functools.partial(self.forward, Tb)
            self.graphs[Tb], self.logits[Tb] = capture_graph(forward, pool, self.model.tp.size)
        enqueue = min(self._eager_enqueue_ms(self.buckets[0]) for _ in range(3))
        replay = {Tb: self._replay_ms(Tb) for Tb in self.buckets}
        # Every rank keeps the same buckets (its graphs' collectives must match): kept where all ranks keep it.
        keep = self.model.tp.min_over_ranks([int(replay[Tb] <= enqueue) for Tb in self.buckets])
        self.buckets = [Tb for Tb, k in zip(self.buckets, keep) if k]
        for Tb in set(self.graphs) - set(self.buckets):
            del self.graphs[Tb], self.logits[Tb]
        logger.info("captured CUDA graphs for prefill token counts %s (up to %d sequences) in %.1f s: replays "
                    "%s ms against %.1f ms to enqueue an eager forward; kept %s", list(replay), self.max_seqs,
                    time.perf_counter() - start, [round(ms, 1) for ms in replay.values()], enqueue, self.buckets)

    def _eager_enqueue_ms(self, Tb: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        self.forward(Tb)
        ms = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return ms

    def _replay_ms(self, Tb: int) -> float:
        """Median device time of three replays."""
        times = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            self.graphs[Tb].replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return sorted(times)[1]

    def _write_padding(self, Tb: int, T: int, B: int) -> None:
        """Tokens T..Tb-1 and sequences B.. of the host mirror set to padding."""
        h, at, ints, S = self.host, self.long_at, self.int_at, self.max_seqs
        h[at["input_ids"] + T: at["input_ids"] + Tb] = 0
        h[at["positions"] + T: at["positions"] + Tb] = 0
        h[at["slot_mapping"] + T: at["slot_mapping"] + Tb] = -1
        h[ints["query_start_loc"] + B + 1: ints["query_start_loc"] + S + 1] = T  # empty, after the real tokens
        h[ints["seq_lens"] + B: ints["seq_lens"] + S] = 0
        h[ints["state_slots"] + B: ints["state_slots"] + S] = PAD_SLOT
        h[ints["has_initial_state"] + B: ints["has_initial_state"] + S] = 0

    def load(self, batch: StagedBatch, num_samplers: int) -> int:
        """Writes a staged batch (one that fits) into the static inputs; returns its bucket."""
        (ids_a, ids_b), (pos_a, _), (slot_a, _), (li_a, _) = batch.long_bounds
        T, B = ids_b - ids_a, batch.B
        Tb = next(b for b in self.buckets if b >= T)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has read the mirror
        staged, h, at, ints = batch.staged.numpy(), self.host, self.long_at, self.int_at
        for name, src, n in (("input_ids", ids_a, T), ("positions", pos_a, T), ("slot_mapping", slot_a, T),
                             ("logits_indices", li_a, num_samplers)):
            h[at[name]: at[name] + n] = staged[src: src + n]
        h[at["logits_indices"] + num_samplers: at["logits_indices"] + self.max_seqs] = 0
        for name, (a, b) in zip(("query_start_loc", "seq_lens", "state_slots", "has_initial_state"),
                                batch.int_bounds):
            h[ints[name]: ints[name] + b - a] = staged[batch.num_longs + a: batch.num_longs + b]
        self._write_padding(Tb, T, B)
        tables = h[ints["block_tables"]: ints["block_tables"] + self.max_seqs * self.width]
        start = batch.num_longs + batch.num_ints
        tables.reshape(self.max_seqs, self.width)[:B, :batch.width] = staged[start:].reshape(B, batch.width)
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return Tb

    @torch.inference_mode()
    def run(self, batch: StagedBatch, num_samplers: int) -> torch.Tensor:
        """The logits [num_samplers, V] of a batch that fits: its bucket's graph replayed (eager where none is
        captured, as on a CPU)."""
        Tb = self.load(batch, num_samplers)
        if Tb in self.graphs:
            self.graphs[Tb].replay()
            logits = self.logits[Tb]
        else:
            logits = self.forward(Tb)
        return logits[:num_samplers]
