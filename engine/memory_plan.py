"""How many KV blocks fit: after the weights are loaded, one profiling forward at the largest batch
measures the activation peak; what is left of gpu_memory_utilization * total goes to max_num_seqs
state slots first, then the prefix cache's state checkpoints (a share of what is left, or an explicit
count), and KV blocks last."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.cache_pools import allocate_layer_caches, kv_block_bytes, state_slot_bytes
from engine.forward_batch import ForwardBatch
from engine.loader import model_weight_bytes
from engine.prompt_logprobs import ROWS_PER_BLOCK, score_rows

logger = logging.getLogger(__name__)

GIB = 1 << 30
ALLOCATOR_SLACK = 512 << 20  # fragmentation and graph-pool overhead the profile does not see
CPU_KV_BUDGET = 4 * GIB  # on CPU there is no profile: a fixed budget
CHECKPOINT_SHARE = 0.1  # of the cache memory left after the state slots, for prefix-cache state checkpoints


@dataclass
class MemoryPlan:
    num_slots: int
    num_blocks: int
    weights_bytes: int
    activation_bytes: int
    slot_bytes: int
    block_bytes: int
    num_checkpoints: int = 0

    def log(self, block_size: int, max_model_len: int) -> None:
        per_seq = -(-max_model_len // block_size) if block_size else 0
        concurrent = self.num_blocks // per_seq if per_seq else self.num_slots
        logger.info("memory plan: weights %.2f GiB, activation peak %.2f GiB, %d state slots x %.1f MiB, "
                    "%d KV blocks x %.2f MiB (%d tokens); %d sequences of max_model_len %d fit at once",
                    self.weights_bytes / GIB, self.activation_bytes / GIB, self.num_slots, self.slot_bytes / 2**20,
                    self.num_blocks, self.block_bytes / 2**20, self.num_blocks * block_size,
                    min(concurrent, self.num_slots), max_model_len)
        logger.info("prefix cache: %d state checkpoints x %.1f MiB (%.2f GiB)", self.num_checkpoints,
                    self.slot_bytes / 2**20, self.num_checkpoints * self.slot_bytes / GIB)


def profile_batch(num_tokens: int, device: torch.device) -> ForwardBatch:
    """One sequence of num_tokens new tokens in slot 0 and blocks 0.., starting from an empty state."""
    i32 = dict(dtype=torch.int32, device=device)
    return ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.long, device=device),
        positions=torch.arange(num_tokens, device=device),
        query_start_loc=torch.tensor([0, num_tokens], **i32),
        seq_lens=torch.tensor([num_tokens], **i32),
        state_slots=torch.zeros(1, **i32),
        has_initial_state=torch.zeros(1, dtype=torch.bool, device=device),
        block_tables=torch.arange(num_tokens, **i32)[None],  # block_size >= 1: enough entries
        slot_mapping=torch.arange(num_tokens, device=device),
        logits_indices=torch.tensor([num_tokens - 1], device=device),
        num_decodes=0, max_query_len=num_tokens, max_seq_len=num_tokens,
    )


def plan_memory(model: torch.nn.Module, cfg, *, device: torch.device, dtype: torch.dtype, state_dtype: torch.dtype,
                max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                gpu_memory_utilization: float, num_kv_blocks: int | None, graph_rows: int = 0,
                graph_tokens: int = 0, prefix_caching: bool = False, num_checkpoints: int | None = None) -> MemoryPlan:
    """graph_rows: rows of all CUDA-graph buckets together. Each graph keeps its own logits buffer (fp32,
    plus the lm_head output over its padded rows in the model dtype); they are reserved here, before the
    caches take the rest. graph_tokens: the largest prefill graph's token count; its activations stay in the
    graphs' pool, beside the eager forward's (reserved as the profiled peak scaled to its share of
    max_num_batched_tokens). num_checkpoints: prefix-cache state checkpoints (None: CHECKPOINT_SHARE of the
    memory left on a GPU, max_num_seqs on CPU); none without prefix_caching."""
    slot_bytes = state_slot_bytes(cfg, dtype, state_dtype)
    block_bytes = kv_block_bytes(cfg, block_size, dtype) if block_size else 0
    weights = model_weight_bytes(model)  # quantized layers at their packed size
    num_slots = max_num_seqs  # CUDA-graph padding rows use PAD_SLOT, which kernels skip: no scratch slot
    blocks_per_seq = -(-max_model_len // block_size) if block_size else 0
    if not prefix_caching:
        num_checkpoints = 0
    if device.type != "cuda":
        activation = 0
        auto_blocks = min(max_num_seqs * blocks_per_seq, max(CPU_KV_BUDGET // max(block_bytes, 1), blocks_per_seq))
        num_checkpoints = max_num_seqs if num_checkpoints is None else num_checkpoints
    else:
        activation = _profile_activation_peak(model, cfg, device, dtype, state_dtype, max_num_batched_tokens,
                                              block_size)
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
        # Our share of the GPU is utilization * total, of which our weights are spent; memory held by
        # others (processes, or engines before this one) only matters if it leaves less than that free.
        head_rows = model.lm_head.weight.shape[0] * model.tp.size  # all ranks' logits, gathered
        graph_logits = graph_rows * (cfg.vocab_size * 4 + head_rows * dtype.itemsize)
        graph_activation = activation * min(graph_tokens / max_num_batched_tokens, 1.0)
        budget = (min(gpu_memory_utilization * total - weights, free) - activation - graph_activation - graph_logits
                  - ALLOCATOR_SLACK)
        for_blocks = budget - num_slots * slot_bytes
        if num_checkpoints is None:  # a share, but never the room one sequence of max_model_len needs
            spare = for_blocks - blocks_per_seq * block_bytes
            num_checkpoints = max(int(min(CHECKPOINT_SHARE * for_blocks, spare) // slot_bytes), 0)
        for_blocks -= num_checkpoints * slot_bytes
        auto_blocks = int(for_blocks // block_bytes) if block_bytes else 0
        if for_blocks < blocks_per_seq * block_bytes:
            raise ValueError(
                f"not enough GPU memory: {gpu_memory_utilization:.2f} x {total / GIB:.1f} GiB leaves "
                f"{max(budget, 0) / GIB:.2f} GiB after weights ({weights / GIB:.2f} GiB) and activations "
                f"({activation / GIB:.2f} GiB); {num_slots} state slots need {num_slots * slot_bytes / GIB:.2f} GiB, "
                f"{num_checkpoints} prefix-cache checkpoints {num_checkpoints * slot_bytes / GIB:.2f} GiB, "
                f"and one sequence of max_model_len {max_model_len} needs {blocks_per_seq * block_bytes / GIB:.2f} "
                "GiB of KV cache. Lower --max-model-len, --max-num-seqs or --prefix-cache-checkpoints, or raise "
                "--gpu-memory-utilization.")
    num_blocks = num_kv_blocks if num_kv_blocks is not None else auto_blocks
    return MemoryPlan(num_slots, num_blocks if block_size else 0, weights, activation, slot_bytes, block_bytes,
                      num_checkpoints)


@torch.inference_mode()
def _profile_activation_peak(model, cfg, device, dtype, state_dtype, num_tokens: int, block_size: int) -> int:
    """Peak bytes a forward of num_tokens prompt tokens allocates beyond weights and its own caches,
    scoring one block of prompt positions (the most prompt logprobs hold at once)."""
    bs = max(block_size, 1)
    caches = allocate_layer_caches(cfg, 1, -(-num_tokens // bs) + 1, bs, dtype, state_dtype, device)
    batch = profile_batch(num_tokens, device)
    batch.slot_mapping = batch.slot_mapping if block_size else torch.full_like(batch.slot_mapping, -1)
    rows = min(num_tokens, ROWS_PER_BLOCK)
    batch.logits_indices = torch.arange(num_tokens - rows, num_tokens, device=device)
    tokens = torch.zeros(rows, dtype=torch.long, device=device)

    def forward(caches):
        score_rows(model.compute_logits, model(batch, caches), tokens, k=20)
        torch.cuda.synchronize(device)

    # The first forward compiles the Triton kernels for the model's shapes before serving, outside the
    # measured peak.
    forward(caches)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward(caches)
    peak = torch.cuda.max_memory_allocated(device) - before
    del caches
    torch.cuda.empty_cache()
    return peak
