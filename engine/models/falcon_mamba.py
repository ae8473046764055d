"""FalconMamba (Mamba1, MODELS.md): a stack of pre-norm residual Mamba1 mixers.

    h = h + Mixer(RMSNorm(h))          (residual stream in fp32 when residual_in_fp32)
    Mixer(u): [x ; z] = W_in u;  x = SiLU(conv(x));  [dl ; B ; C] = W_x x
              dl, B, C = rms(dl), rms(B), rms(C)      (weightless; FalconMamba only, not plain Mamba)
              y = SelectiveScan(x, dt = W_dt dl, A = -exp(A_log), B, C, D, dt_bias) * SiLU(z);  out = W_out y
    logits = lm_head(RMSNorm(h))

Tensor parallelism over N ranks splits d_inner: in_proj's x and z rows, conv1d, dt_proj's rows, A, D
and the state pools by channel; x_proj contracts over d_inner, so each rank's [dl ; B ; C] is a partial
sum, all-reduced before the norms; out_proj is row-parallel (all-reduced). The embedding and the head
are split by vocabulary row.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from engine import ops
from engine.cache_pools import LayerCache
from engine.config import FalconMambaConfig
from engine.distributed import (
    ROW_PARALLEL_BIAS,
    SINGLE,
    LMHead,
    TensorParallel,
    VocabParallelEmbedding,
    shard_checkpoint_tensor,
)
from engine.forward_batch import ForwardBatch
from engine.models.common import RMSNorm, checkpoint_names, pad_vocab_rows, padded_vocab_size
from engine.quantization import linear


class DtProj(nn.Module):
    """W_dt [d_inner, R] in the model dtype; its bias is the scan's dt_bias, kept in fp32."""

    def __init__(self, rank: int, d_inner: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_inner, rank))
        self.bias = nn.Parameter(torch.empty(d_inner, dtype=torch.float32))


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: FalconMambaConfig, tp: TensorParallel):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        d_in, N, R = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
        self.in_proj = linear(cfg.hidden_size, 2 * d_in, cfg.use_bias, cfg.quantization)
        self.conv1d = nn.Conv1d(d_in, d_in, cfg.conv_kernel, groups=d_in, bias=cfg.use_conv_bias)
        self.x_proj = linear(d_in, R + 2 * N, False, None)  # stays 16-bit in quantized checkpoints
        self.dt_proj = DtProj(R, d_in)
        self.A_log = nn.Parameter(torch.empty(d_in, N, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(d_in, dtype=torch.float32))
        self.out_proj = linear(d_in, cfg.hidden_size, cfg.use_bias, cfg.quantization)

    def forward(self, u: torch.Tensor, batch: ForwardBatch, cache: LayerCache) -> torch.Tensor:
        cfg = self.cfg
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = ops.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, cache.conv_state, batch)
        sizes = [cfg.time_step_rank, cfg.state_size, cfg.state_size]
        dlBC = self.tp.all_reduce(self.x_proj(x))
        if cfg.bcdt_norm and batch.num_prefill_seqs == 0:
            # decode: rms(dl) = s * dl, so dt = s * W_dt dl; the three norms move into the state update's kernel
            dt = dlBC[:, :cfg.time_step_rank] @ self.dt_proj.weight.t()
            y = ops.mamba1_decode_step(x, dt, dlBC, cfg.mixer_rms_eps, self.A, self.D, self.dt_proj.bias, z,
                                       cache.ssm_state, batch)
            return self.tp.all_reduce(self.out_proj(y))
        if cfg.bcdt_norm:  # dl, B, C = rms(dl), rms(B), rms(C)
            dlBC = ops.split_rms_norm(dlBC, sizes, cfg.mixer_rms_eps)
        dl, B, C = dlBC.split(sizes, dim=-1)
        dt = dl @ self.dt_proj.weight.t()
        y = ops.mamba1_scan(x, dt, self.A, B, C, self.D, self.dt_proj.bias, z, cache.ssm_state, batch)
        return self.tp.all_reduce(self.out_proj(y))


class Block(nn.Module):
    def __init__(self, cfg: FalconMambaConfig, tp: TensorParallel):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = Mamba1Mixer(cfg, tp)


class Backbone(nn.Module):
    def __init__(self, cfg: FalconMambaConfig, tp: TensorParallel):
        super().__init__()
        self.embeddings = VocabParallelEmbedding(cfg.vocab_size, padded_vocab_size(cfg.vocab_size, tp.size),
                                                 cfg.hidden_size, tp)
        self.layers = nn.ModuleList(Block(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


def shard_config(cfg: FalconMambaConfig, tp: TensorParallel) -> FalconMambaConfig:
    """The sizes one of tp.size ranks holds; ValueError if d_inner does not split evenly."""
    if cfg.intermediate_size % tp.size:
        raise ValueError(f"tensor_parallel_size {tp.size} cannot split this model: its intermediate_size "
                         f"(d_inner, {cfg.intermediate_size}) is not divisible by {tp.size}")
    return dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size // tp.size)


class FalconMambaForCausalLM(nn.Module):
    shard_config = staticmethod(shard_config)

    def __init__(self, cfg: FalconMambaConfig, tp: TensorParallel = SINGLE):
        """cfg: the checkpoint's config; the modules are built at this rank's sizes (rank_cfg)."""
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.rank_cfg = shard_config(cfg, tp)
        self.backbone = Backbone(self.rank_cfg, tp)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, padded_vocab_size(cfg.vocab_size, tp.size), tp)
        if cfg.tie_word_embeddings:  # the head shares the embedding table (unpadded on one rank)
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(self, batch: ForwardBatch, caches: list[LayerCache]) -> torch.Tensor:
        """Returns the final hidden states [S, d] of the rows in batch.logits_indices."""
        h = self.backbone.embeddings(batch.input_ids)
        residual = h.float() if self.cfg.residual_in_fp32 else h
        layers = self.backbone.layers
        xn = layers[0].norm(h)
        for i, (layer, cache) in enumerate(zip(layers, caches)):
            out = layer.mixer(xn, batch, cache)
            if i + 1 < len(layers):  # h = h + out, fused with the next layer's norm
                nxt = layers[i + 1].norm
                xn, residual = ops.add_rms_norm(out, residual, nxt.weight, nxt.eps)
        idx = batch.logits_indices
        norm = self.backbone.norm_f
        return ops.add_rms_norm(out[idx], residual[idx], norm.weight, norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def finalize_weights(self) -> None:
        """Once loaded: A = -exp(A_log) computed once rather than every step."""
        for layer in self.backbone.layers:
            layer.mixer.register_buffer("A", -torch.exp(layer.mixer.A_log.float()), persistent=False)

    def checkpoint_names(self) -> set[str]:
        names = checkpoint_names(self)
        return names - {"lm_head.weight"} if self.cfg.tie_word_embeddings else names

    # transformers computes dt as dt_proj.weight @ x (the module is never called), so PEFT's dt_proj adapters
    # never act there, and in training never learn: accepted, and left out exactly as transformers does.
    LORA_INERT = {"dt_proj": "transformers never applies it (dt = dt_proj.weight @ x), so training never learns it"}

    def lora_targets(self) -> list[str]:
        """The projections an adapter may change: each mixer's in_proj, x_proj and out_proj."""
        return [f"backbone.layers.{i}.mixer.{p}" for i in range(self.cfg.num_hidden_layers)
                for p in ("in_proj", "x_proj", "out_proj")]

    def lora_multiplier(self, module: str) -> None:
        return None  # no multipliers are folded into FalconMamba's weights

    def load_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        n = self.tp.size
        if name == "lm_head.weight":  # when tied, the embedding fills it
            return [] if self.cfg.tie_word_embeddings else [(name, pad_vocab_rows(tensor, n))]
        if name == "backbone.embeddings.weight" and n > 1:  # split evenly: padded like the head
            return [(name, pad_vocab_rows(tensor, n))]
        return [(name, tensor)]

    def shard_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a checkpoint tensor."""
        return shard_checkpoint_tensor(self.tp_layout(), name, tensor, self.tp)

    def tp_layout(self) -> dict:
        """How each tensor splits over the ranks: (dim, segments of (units, rows per unit)); not listed:
        replicated (norms). d_inner channels are the units."""
        channels = (self.cfg.intermediate_size, 1)
        by_channel = (0, [channels])
        vocab = (0, [(padded_vocab_size(self.cfg.vocab_size, self.tp.size), 1)])
        return {
            "backbone.embeddings.weight": vocab, "lm_head.weight": vocab,
            "mixer.in_proj.weight": (0, [channels, channels]), "mixer.in_proj.bias": (0, [channels, channels]),
            "mixer.conv1d.weight": by_channel, "mixer.conv1d.bias": by_channel,
            "mixer.x_proj.weight": (1, [channels]),
            "mixer.dt_proj.weight": by_channel, "mixer.dt_proj.bias": by_channel,
            "mixer.A_log": by_channel, "mixer.D": by_channel,
            "mixer.out_proj.weight": (1, [channels]), "mixer.out_proj.bias": ROW_PARALLEL_BIAS,
        }
