"""Owns the tensors: the model, its cache pools, and turning a ScheduledBatch into one flat ForwardBatch
whose logits (one row per sequence that samples) come back from a single forward pass, with the scores
of the prompt positions that sequences asking for prompt logprobs computed in this step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from engine.cache_manager import Copy
from engine.cache_pools import allocate_layer_caches
from engine.config import EngineArgs, FalconH1Config, ModelConfig
from engine.cuda_graphs import DecodeGraphs, bucket_sizes
from engine.forward_batch import ForwardBatch
from engine.loader import load_model
from engine.lora.layers import LoRAContext, install_lora
from engine.memory_plan import plan_memory
from engine.prompt_logprobs import PromptScores, score_rows, split_scores
from engine.scheduler import ScheduledBatch
from kernels import PAD_SLOT

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


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


class ModelRunner:
    def __init__(self, args: EngineArgs, model_dir: Path, arch: str, cfg: ModelConfig, max_model_len: int,
                 max_num_batched_tokens: int):
        self.args, self.cfg = args, cfg
        self.device = resolve_device(args.device)
        self.dtype = cfg.dtype if args.dtype == "auto" else _DTYPES[args.dtype]
        if self.device.type == "cpu" and self.dtype is torch.float16:
            logger.warning("float16 on CPU is slow and imprecise; consider --dtype float32")
        self.state_dtype = _DTYPES[args.ssm_state_dtype]
        self.block_size = args.kv_block_size if isinstance(cfg, FalconH1Config) else 0  # pure SSMs: no KV
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        self.model = load_model(model_dir, arch, cfg, self.dtype, self.device, dummy=args.load_format == "dummy")
        logger.info("model loaded in %.1f s", time.perf_counter() - start)
        self.lora_context: LoRAContext | None = None
        self.lora_slices = {}
        if args.enable_lora:  # the adapter stacks are allocated now, so the memory plan counts them
            self.lora_context, self.lora_slices = install_lora(self.model, args.max_loras, args.max_lora_rank,
                                                               self.dtype, self.device)
        plan = plan_memory(self.model, cfg, device=self.device, dtype=self.dtype, state_dtype=self.state_dtype,
                           max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_model_len=max_model_len, block_size=self.block_size,
                           gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
                           graph_rows=sum(bucket_sizes(args.max_num_seqs)) if self._uses_graphs() else 0,
                           prefix_caching=args.enable_prefix_caching, num_checkpoints=args.prefix_cache_checkpoints)
        plan.log(self.block_size, max_model_len)
        self.num_slots, self.num_blocks, self.num_checkpoints = plan.num_slots, plan.num_blocks, plan.num_checkpoints
        # State rows: num_slots for running sequences, then the prefix cache's checkpoints (CacheManager).
        self.caches = allocate_layer_caches(cfg, self.num_slots + self.num_checkpoints, max(self.num_blocks, 1),
                                            max(self.block_size, 1), self.dtype, self.state_dtype, self.device)
        self.graphs: DecodeGraphs | None = None
        if self._uses_graphs():
            self.graphs = DecodeGraphs(self.model, self.caches, args.max_num_seqs, max_model_len, self.block_size,
                                       self.device, self.lora_context)
            self.graphs.capture()

    def _uses_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.args.enforce_eager

    def prepare(self, sched: ScheduledBatch) -> ForwardBatch:
        """The flat batch; its logits_indices are the sampling rows, then the prompt rows to score. All its
        tensors travel in one host-to-device copy."""
        input_ids, positions, slot_mapping, logits_indices, score_indices = [], [], [], [], []
        query_start_loc, seq_lens = [0], []
        bs = self.block_size
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
        if self.device.type == "cuda":
            staged = staged.pin_memory()
        flat = staged.to(self.device, non_blocking=True)
        flat_ints = flat[len(longs):].to(torch.int32)
        input_ids_t, positions_t, slot_mapping_t, logits_indices_t = (flat[a:b] for a, b in long_bounds)
        qsl, seq_lens_t, slots_t, init_t, lora_slots_t = (flat_ints[a:b] for a, b in int_bounds)
        tables_t = flat_ints[len(ints):]
        return ForwardBatch(
            input_ids=input_ids_t, positions=positions_t, query_start_loc=qsl, seq_lens=seq_lens_t,
            state_slots=slots_t, has_initial_state=init_t.bool(), block_tables=tables_t.view(B, width),
            slot_mapping=slot_mapping_t, logits_indices=logits_indices_t, num_decodes=sched.num_decodes,
            max_query_len=max(sched.num_new_tokens), max_seq_len=max(seq_lens),
            lora_slots=lora_slots_t if lora_slots else None,
        )

    @torch.inference_mode()
    def execute(self, sched: ScheduledBatch) -> tuple[torch.Tensor, dict[int, PromptScores]]:
        """Runs one step; returns logits [S, V] (fp32) for the sequences that sample, in batch order, and
        the prompt scores of this step keyed by batch index."""
        seqs = sched.seqs
        if self.graphs is not None and sched.num_decodes == len(seqs) and self.graphs.fits(len(seqs)):
            return self.graphs.run([s.token_ids[-1] for s in seqs], [s.num_tokens - 1 for s in seqs],
                                   [s.state_slot for s in seqs], [s.block_table for s in seqs],
                                   [s.lora_slot for s in seqs]), {}
        batch = self.prepare(sched)
        if self.lora_context is not None:
            self.lora_context.row_slots = batch.lora_slots
        hidden = self.model(batch, self.caches)
        num_samplers = sum(map(sched.samples, range(len(seqs))))
        logits = self.model.compute_logits(hidden[:num_samplers])
        if hidden.shape[0] == num_samplers:
            return logits, {}
        return logits, self._score_prompts(sched, hidden[num_samplers:])

    def _score_prompts(self, sched: ScheduledBatch, hidden: torch.Tensor) -> dict[int, PromptScores]:
        """hidden: the final hidden states of the prompt rows prepare() listed, in the same order."""
        targets, spans, owners = [], [], []
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            scored = seq.prompt_positions_to_score(n)
            if scored:
                spans.append((len(targets), len(scored), seq.params.prompt_logprobs))
                owners.append(i)
                targets += seq.token_ids[scored.start + 1: scored.stop + 1]
        k = max(k for _, _, k in spans)
        scores = score_rows(self.model.compute_logits, hidden, torch.tensor(targets, device=self.device), k)
        return dict(zip(owners, split_scores(scores, spans)))

    def apply_copies(self, copies: list[Copy]) -> None:
        """The cache manager's queued row and block copies, in order (later ones may overwrite a source)."""
        for copy in copies:
            (self.copy_state if copy.kind == "state" else self.copy_block)(copy.src, copy.dst)

    @torch.inference_mode()
    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        for cache in self.caches:
            cache.conv_state[dst_slot] = cache.conv_state[src_slot]
            cache.ssm_state[dst_slot] = cache.ssm_state[src_slot]

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        for cache in self.caches:
            cache.k_cache[dst] = cache.k_cache[src]
            cache.v_cache[dst] = cache.v_cache[src]
