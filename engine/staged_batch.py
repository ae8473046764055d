"""A step's flat batch packed on the host in one int64 tensor (what tensor-parallel workers are sent), and
moved to the device in one copy: each copy costs a launch and a sync point, so the fields travel together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.forward_batch import ForwardBatch
from engine.scheduler import ScheduledBatch
from kernels import PAD_SLOT


def _pack(segments: list[list[int]], align: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The segments end to end, each starting at a multiple of `align` elements (so views of the device copy
    are 16-byte aligned, as Triton specializes on), and each one's (start, end)."""
    flat: list[int] = []
    bounds = []
    for seg in segments:
        bounds.append((len(flat), len(flat) + len(seg)))
        flat += seg
        flat += [0] * (-len(seg) % align)
    return flat, bounds


@dataclass
class StagedBatch:
    """A flat batch packed on the host: one int64 tensor and where each field lies in it."""

    staged: torch.Tensor
    long_bounds: list[tuple[int, int]]
    int_bounds: list[tuple[int, int]]
    num_longs: int
    num_ints: int
    B: int
    width: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int


def stage_batch(sched: ScheduledBatch, block_size: int) -> StagedBatch:
    """The flat batch of a step packed on the host (what tensor-parallel workers are sent)."""
    bs = block_size
    input_ids, positions, slot_mapping, logits_indices, score_indices = [], [], [], [], []
    query_start_loc, seq_lens = [0], []
    for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
        start = seq.num_computed_tokens
        input_ids += seq.token_ids[start: start + n]
        positions += range(start, start + n)
        if n == 1 and bs:
            slot_mapping.append(seq.block_table[start // bs] * bs + start % bs)
        elif bs:  # a prefill chunk: its KV slots computed with numpy
            pos = np.arange(start, start + n)
            slot_mapping += (np.asarray(seq.block_table)[pos // bs] * bs + pos % bs).tolist()
        score_indices += [query_start_loc[-1] + p - start for p in seq.prompt_positions_to_score(n)]
        query_start_loc.append(query_start_loc[-1] + n)
        seq_lens.append(start + n)
        if sched.samples(i):
            logits_indices.append(query_start_loc[-1] - 1)
    logits_indices += score_indices
    T, B = len(input_ids), len(sched.seqs)
    width = max((len(s.block_table) for s in sched.seqs), default=0) or 1
    tables = np.zeros((B, width), dtype=np.int64)
    for row, s in zip(tables, sched.seqs):
        row[: len(s.block_table)] = s.block_table
    # Each token's LoRA adapter slot, only when some row has an adapter (else the adapters' kernels are skipped).
    lora_slots = [s.lora_slot for s, n in zip(sched.seqs, sched.num_new_tokens) for _ in range(n)] \
        if any(s.lora_slot != PAD_SLOT for s in sched.seqs) else []
    # One int64 buffer: the int64 fields, then the int32 ones (cast on the device), each 16-byte aligned;
    # the block tables last.
    longs, long_bounds = _pack([input_ids, positions, slot_mapping if bs else [PAD_SLOT] * T, logits_indices], 2)
    ints, int_bounds = _pack([query_start_loc, seq_lens, [s.state_slot for s in sched.seqs],
                              [s.num_computed_tokens > 0 for s in sched.seqs], lora_slots], 4)
    staged = torch.from_numpy(np.concatenate([np.array(longs + ints, dtype=np.int64), tables.ravel()]))
    return StagedBatch(staged, long_bounds, int_bounds, len(longs), len(ints), B, width, sched.num_decodes,
                       max(sched.num_new_tokens), max(seq_lens))


def unstage_batch(host: StagedBatch, device: torch.device) -> ForwardBatch:
    """The ForwardBatch of a staged batch, moved to `device` in one copy."""
    staged, long_bounds, int_bounds, B, width = host.staged, host.long_bounds, host.int_bounds, host.B, host.width
    if device.type == "cuda":
        staged = staged.pin_memory()
    flat = staged.to(device, non_blocking=True)
    flat_ints = flat[host.num_longs:].to(torch.int32)
    input_ids_t, positions_t, slot_mapping_t, logits_indices_t = (flat[a:b] for a, b in long_bounds)
    qsl, seq_lens_t, slots_t, init_t, lora_slots_t = (flat_ints[a:b] for a, b in int_bounds)
    tables_t = flat_ints[host.num_ints:]
    return ForwardBatch(
        input_ids=input_ids_t, positions=positions_t, query_start_loc=qsl, seq_lens=seq_lens_t,
        state_slots=slots_t, has_initial_state=init_t.bool(), block_tables=tables_t.view(B, width),
        slot_mapping=slot_mapping_t, logits_indices=logits_indices_t, num_decodes=host.num_decodes,
        max_query_len=host.max_query_len, max_seq_len=host.max_seq_len,
        lora_slots=lora_slots_t if lora_slots_t.numel() else None,
    )
