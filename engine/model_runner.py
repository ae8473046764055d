"""Owns the tensors: the model, its cache pools, and turning a ScheduledBatch into one flat ForwardBatch
whose logits (one row per sequence that samples) come back from a single forward pass, with the scores
of the prompt positions that sequences asking for prompt logprobs computed in this step.

Under tensor parallelism the runner of rank 0 starts the workers (engine/distributed/workers.py), each
with a runner of its own over its shard; the methods marked `on_all_ranks` run on every rank with the
same arguments (the flat batch goes as host tensors), and only rank 0's results are used."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine.cache_manager import Copy
from engine.cache_pools import allocate_layer_caches
from engine.config import EngineArgs, FalconH1Config, ModelConfig
from engine.cuda_graphs import DecodeGraphs, bucket_sizes
from engine.distributed.group import TensorParallel, destroy_tensor_parallel, init_tensor_parallel, rank_device
from engine.distributed.workers import Workers, on_all_ranks
from engine.forward_batch import ForwardBatch
from engine.loader import check_tensor_parallel, load_model
from engine.lora.layers import LoRAContext, install_lora
from engine.memory_plan import plan_memory
from engine.prefill_graphs import PREFILL_GRAPH_SEQS, PrefillGraphs, prefill_buckets
from engine.prompt_logprobs import PromptScores, score_rows, split_scores
from engine.sampled_tokens import SampledTokens
from engine.scheduler import ScheduledBatch
from engine.staged_batch import StagedBatch, stage_batch, unstage_batch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


class ModelRunner:
    def __init__(self, args: EngineArgs, model_dir: Path, arch: str, cfg: ModelConfig, max_model_len: int,
                 max_num_batched_tokens: int, tp: TensorParallel | None = None):
        """tp: given to a worker's runner; rank 0's (None) starts the workers itself."""
        self.args = args
        device = resolve_device(args.device)
        self.workers: Workers | None = None
        if tp is None:
            tp = TensorParallel(0, args.tensor_parallel_size)
            if tp.size > 1:
                check_tensor_parallel(arch, cfg, tp.size)  # before any worker starts
                if device.type == "cuda" and torch.cuda.device_count() < tp.size:
                    raise ValueError(f"tensor_parallel_size {tp.size} needs {tp.size} GPUs; "
                                     f"{torch.cuda.device_count()} are visible")
                self.workers = Workers(tp.size, device,
                                       (args, model_dir, arch, cfg, max_model_len, max_num_batched_tokens))
        try:
            if self.workers is not None:
                init_tensor_parallel(0, tp.size, self.workers.port, rank_device(device, 0))
            self._start(tp, device, model_dir, arch, cfg, max_model_len, max_num_batched_tokens)
        except BaseException:
            self.close()
            raise

    def _start(self, tp: TensorParallel, device: torch.device, model_dir: Path, arch: str, cfg: ModelConfig,
               max_model_len: int, max_num_batched_tokens: int) -> None:
        """Loads this rank's shard, plans its memory, allocates the caches, captures the graphs: the same
        steps (and collectives) on every rank."""
        args = self.args
        self.tp = tp
        self.device = rank_device(device, tp.rank)
        self.dtype = cfg.dtype if args.dtype == "auto" else _DTYPES[args.dtype]
        if self.device.type == "cpu" and self.dtype is torch.float16:
            logger.warning("float16 on CPU is slow and imprecise; consider --dtype float32")
        self.state_dtype = _DTYPES[args.ssm_state_dtype]
        self.block_size = args.kv_block_size if isinstance(cfg, FalconH1Config) else 0  # pure SSMs: no KV
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        self.model = load_model(model_dir, arch, cfg, self.dtype, self.device, dummy=args.load_format == "dummy",
                                tp=tp)
        logger.info("model loaded in %.1f s", time.perf_counter() - start)
        self.cfg = cfg = self.model.rank_cfg  # the sizes of this rank's shard: its caches
        self.lora_context: LoRAContext | None = None
        self.lora_slices = {}
        if args.enable_lora:  # the adapter stacks are allocated now, so the memory plan counts them
            self.lora_context, self.lora_slices = install_lora(self.model, args.max_loras, args.max_lora_rank,
                                                               self.dtype, self.device)
        plan = plan_memory(self.model, cfg, device=self.device, dtype=self.dtype, state_dtype=self.state_dtype,
                           max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_model_len=max_model_len, block_size=self.block_size,
                           gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
                           graph_rows=self._graph_rows(max_num_batched_tokens),
                           graph_tokens=prefill_buckets(max_num_batched_tokens)[-1] if self._uses_graphs() else 0,
                           prefix_caching=args.enable_prefix_caching, num_checkpoints=args.prefix_cache_checkpoints)
        # Every rank plans its own memory; the tightest sizes the pools of all.
        plan.num_slots, plan.num_blocks, plan.num_checkpoints = tp.min_over_ranks(
            [plan.num_slots, plan.num_blocks, plan.num_checkpoints])
        plan.log(self.block_size, max_model_len)
        self.num_slots, self.num_blocks, self.num_checkpoints = plan.num_slots, plan.num_blocks, plan.num_checkpoints
        # State rows: num_slots for running sequences, then the prefix cache's checkpoints (CacheManager).
        self.caches = allocate_layer_caches(cfg, self.num_slots + self.num_checkpoints, max(self.num_blocks, 1),
                                            max(self.block_size, 1), self.dtype, self.state_dtype, self.device)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if self._uses_graphs():
            pool = torch.cuda.graph_pool_handle()  # one pool: the largest graph (a prefill) is captured first
            self.prefill_graphs = PrefillGraphs(self.model, self.caches, max_num_batched_tokens, max_model_len,
                                                self.block_size, self.device)
            if self.lora_context is not None:
                self.lora_context.row_slots = None  # prefill graphs run no adapter (fits() refuses LoRA rows)
            self.prefill_graphs.capture(pool)
            self.graphs = DecodeGraphs(self.model, self.caches, args.max_num_seqs, max_model_len, self.block_size,
                                       self.device, self.lora_context)
            self.graphs.capture(pool)

    def _uses_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.args.enforce_eager

    def _graph_rows(self, max_num_batched_tokens: int) -> int:
        """Logits rows of all graphs: each decode bucket's rows, PREFILL_GRAPH_SEQS per prefill bucket."""
        if not self._uses_graphs():
            return 0
        prefill_rows = PREFILL_GRAPH_SEQS * len(prefill_buckets(max_num_batched_tokens))
        return sum(bucket_sizes(self.args.max_num_seqs)) + prefill_rows

    @property
    def failure(self) -> str | None:
        """Why the model is no longer whole (a tensor-parallel worker exited), or None."""
        return self.workers.failure if self.workers is not None else None

    def close(self) -> None:
        """Stops the tensor-parallel workers and leaves the process group (idempotent)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None
            destroy_tensor_parallel()

    def prepare(self, sched: ScheduledBatch) -> ForwardBatch:
        """The flat batch on the device; its logits_indices are the sampling rows, then the prompt rows to
        score. All its tensors travel in one host-to-device copy (stage_batch, then unstage_batch)."""
        return unstage_batch(stage_batch(sched, self.block_size), self.device)

    def execute(self, sched: ScheduledBatch, sampled: SampledTokens | None = None
                ) -> tuple[torch.Tensor, dict[int, PromptScores]]:
        """Runs one step; returns logits [S, V] (fp32) for the sequences that sample, in batch order, and
        the prompt scores of this step keyed by batch index. sampled: a decode-only step's input tokens,
        still on the device (one rank only: workers are sent host values)."""
        seqs = sched.seqs
        assert sampled is None or (self.workers is None and sched.num_decodes == len(seqs))
        if self.graphs is not None and sched.num_decodes == len(seqs) and self.graphs.fits(len(seqs)):
            return self.replay_decode([s.token_ids[-1] for s in seqs], [s.num_tokens - 1 for s in seqs],
                                      [s.state_slot for s in seqs], [s.block_table for s in seqs],
                                      [s.lora_slot for s in seqs], sampled), {}
        num_samplers = sum(map(sched.samples, range(len(seqs))))
        staged = stage_batch(sched, self.block_size)
        if self.prefill_graphs is not None and sampled is None and self.prefill_graphs.fits(staged, num_samplers):
            return self.replay_prefill(staged, num_samplers), {}
        targets, spans, owners = self._prompt_targets(sched)
        k = max((k for *_, k in spans), default=0)
        logits, scores = self.forward(staged, num_samplers, targets, k, sampled)
        return logits, dict(zip(owners, split_scores(scores, spans))) if spans else {}

    @on_all_ranks
    @torch.inference_mode()
    def replay_decode(self, input_ids: list[int], positions: list[int], state_slots: list[int],
                      block_tables: list[list[int]], lora_slots: list[int],
                      sampled: SampledTokens | None = None) -> torch.Tensor:
        return self.graphs.run(input_ids, positions, state_slots, block_tables, lora_slots, sampled)

    @on_all_ranks
    def replay_prefill(self, batch: StagedBatch, num_samplers: int) -> torch.Tensor:
        return self.prefill_graphs.run(batch, num_samplers)

    @on_all_ranks
    @torch.inference_mode()
    def forward(self, batch: StagedBatch, num_samplers: int, score_targets: list[int], k: int,
                sampled: SampledTokens | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The logits of the batch's first num_samplers rows, and the scores (score_rows) of the rest
        against score_targets, if any. sampled: a decode-only batch's input tokens, on the device."""
        forward_batch = unstage_batch(batch, self.device)
        if sampled is not None:
            sampled.write_inputs(forward_batch.input_ids, forward_batch.state_slots, forward_batch.slot_mapping,
                                 forward_batch.seq_lens)
        if self.lora_context is not None:
            self.lora_context.row_slots = forward_batch.lora_slots
        hidden = self.model(forward_batch, self.caches)
        logits = self.model.compute_logits(hidden[:num_samplers])
        if not score_targets:
            return logits, None
        targets = torch.tensor(score_targets, device=self.device)
        return logits, score_rows(self.model.compute_logits, hidden[num_samplers:], targets, k)

    def _prompt_targets(self, sched: ScheduledBatch) -> tuple[list[int], list[tuple[int, int, int]], list[int]]:
        """The next token of each prompt row prepare() listed, in the same order; per sequence scoring some,
        its (first row, rows, k) span and its batch index."""
        targets, spans, owners = [], [], []
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            scored = seq.prompt_positions_to_score(n)
            if scored:
                spans.append((len(targets), len(scored), seq.params.prompt_logprobs))
                owners.append(i)
                targets += seq.token_ids[scored.start + 1: scored.stop + 1]
        return targets, spans, owners

    @on_all_ranks
    def apply_copies(self, copies: list[Copy]) -> None:
        """The cache manager's queued row and block copies, in order (later ones may overwrite a source)."""
        for copy in copies:
            (self._copy_state if copy.kind == "state" else self._copy_block)(copy.src, copy.dst)

    @on_all_ranks
    def copy_state(self, src_slot: int, dst_slot: int) -> None:
        self._copy_state(src_slot, dst_slot)

    @on_all_ranks
    def copy_block(self, src: int, dst: int) -> None:
        self._copy_block(src, dst)

    @torch.inference_mode()
    def _copy_state(self, src_slot: int, dst_slot: int) -> None:
        for cache in self.caches:
            cache.conv_state[dst_slot] = cache.conv_state[src_slot]
            cache.ssm_state[dst_slot] = cache.ssm_state[src_slot]

    @torch.inference_mode()
    def _copy_block(self, src: int, dst: int) -> None:
        for cache in self.caches:
            cache.k_cache[dst] = cache.k_cache[src]
            cache.v_cache[dst] = cache.v_cache[src]
