"""Falcon-H1: each layer runs a Mamba2 mixer and GQA attention side by side on the same normed input,
then a SwiGLU MLP (MODELS.md has the equations).

    xn = RMSNorm(h)
    h  = h + Mamba2(xn) + Attention(xn)
    h  = h + MLP(RMSNorm(h))
    logits = lm_head(RMSNorm(h))

All muP multipliers are folded into the weights while loading (`load_transform`), so the forward pass
below has none. Parameter names equal the checkpoint's tensor names, except in the two fused projections
declared with their parts (engine/quantization/fused.py): each layer's `in_proj` holds the checkpoint's
mamba.in_proj and self_attn.q_proj / k_proj / v_proj, `feed_forward.gate_up_proj` its gate_proj and up_proj;
the loader writes each of those tensors into its rows.

Tensor parallelism over N ranks (`tp_layout` says how each tensor splits; `shard_config` the sizes and
which N the model can be split by): attention q/k/v are column-parallel by head (KV heads replicated
when fewer than N), o_proj row-parallel; Mamba2's in_proj is column-parallel by SSM head for z, x, dt
and by group for B, C (groups replicated when fewer than N), conv1d, A, D, dt_bias, the gated norm and
the state pools split the same way, out_proj row-parallel; the layer sums its attention and Mamba
outputs before ONE all-reduce. MLP gate/up column-parallel, down row-parallel (one all-reduce). The
embedding and the head are split by vocabulary row. Multipliers fold into the full tensors before they
are sharded.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.cache_pools import LayerCache
from engine.config import FalconH1Config
from engine.distributed import (
    ROW_PARALLEL_BIAS,
    SINGLE,
    LMHead,
    TensorParallel,
    VocabParallelEmbedding,
    gated_rms_norm_across_ranks,
    local_count,
    shard_checkpoint_tensor,
)
from engine.forward_batch import ForwardBatch
from engine.models.common import RMSNorm, checkpoint_names, pad_vocab_rows, padded_vocab_size
from engine.quantization import Part, fused_linear, linear


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: FalconH1Config, tp: TensorParallel, norm_ranks: int):
        """cfg: this rank's sizes (shard_config); norm_ranks: ranks one group's channels span (> 1 when
        there are fewer groups than ranks: the gated norm then sums over them)."""
        super().__init__()
        self.cfg, self.tp, self.norm_ranks = cfg, tp, norm_ranks
        H = cfg.mamba_n_heads
        # in_proj [z | xBC | dt] is the layer's, fused with attention's q, k, v (DecoderLayer)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.mamba_d_conv, groups=cfg.conv_dim,
                                bias=cfg.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.norm = RMSNorm(cfg.mamba_d_ssm, cfg.rms_norm_eps) if cfg.mamba_rms_norm else None
        self.out_proj = linear(cfg.mamba_d_ssm, cfg.hidden_size, cfg.projectors_bias, cfg.quantization)

    def forward(self, zxbcdt: torch.Tensor, batch: ForwardBatch, cache: LayerCache) -> torch.Tensor:
        """zxbcdt = in_proj(u), computed by the layer together with attention's q, k, v."""
        cfg, T = self.cfg, zxbcdt.shape[0]
        H, P, G, N = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
        z, xBC, dt = zxbcdt.split([cfg.mamba_d_ssm, cfg.conv_dim, H], dim=-1)
        xBC = ops.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, cache.conv_state, batch)
        x, B, C = xBC.split([cfg.mamba_d_ssm, G * N, G * N], dim=-1)
        y = ops.mamba2_scan(x.reshape(T, H, P), dt, self.A, B.reshape(T, G, N), C.reshape(T, G, N), self.D,
                            self.dt_bias, cfg.time_step_limit, cache.ssm_state, batch, cfg.mamba_chunk_size)
        y = y.reshape(T, cfg.mamba_d_ssm)
        if self.norm is None:
            y = y * F.silu(z)
        elif self.norm_ranks > 1:
            y = gated_rms_norm_across_ranks(y, z, self.norm.weight, self.norm.eps, self.norm_ranks,
                                            cfg.mamba_norm_before_gate, self.tp)
        else:
            y = ops.gated_rms_norm(y, z, self.norm.weight, self.norm.eps, G, cfg.mamba_norm_before_gate)
        return self.out_proj(y)


class Attention(nn.Module):
    def __init__(self, cfg: FalconH1Config):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # q_proj, k_proj, v_proj are the layer's, fused with Mamba's in_proj (DecoderLayer)
        self.o_proj = linear(self.num_heads * self.head_dim, cfg.hidden_size, cfg.attention_bias, cfg.quantization)
        self.scale = self.head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, cache: LayerCache,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """q, k, v: the projections of the layer's input, computed by the layer with Mamba's in_proj."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        # rotated k, v to the cache; with prefill rows also to new_kv, for attention to read them densely
        q, new_kv = ops.rope_write_kv(q, k, v, inv_freq, cache.k_cache, cache.v_cache, batch)
        o = ops.paged_attention(q, cache.k_cache, cache.v_cache, batch, self.scale, new_kv)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: FalconH1Config, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        I, bias = cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = fused_linear(cfg.hidden_size, [Part("gate_proj", I, bias), Part("up_proj", I, bias)],
                                         cfg.quantization)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, cfg.quantization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(ops.silu_mul_linear(self.gate_up_proj(x), self.down_proj))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: FalconH1Config, tp: TensorParallel, norm_ranks: int):
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # One matmul for everything that reads the normed input: fewer, larger matmuls stream weights faster
        q, kv, bias = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.attention_bias
        in_proj = [Part("mamba.in_proj", cfg.mamba_d_ssm + cfg.conv_dim + cfg.mamba_n_heads, cfg.mamba_proj_bias),
                   Part("self_attn.q_proj", q, bias), Part("self_attn.k_proj", kv, bias),
                   Part("self_attn.v_proj", kv, bias)]
        self.in_proj = fused_linear(cfg.hidden_size, in_proj, cfg.quantization)
        self.in_proj_sizes = [part.rows for part in in_proj]
        self.mamba = Mamba2Mixer(cfg, tp, norm_ranks)
        self.self_attn = Attention(cfg)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MLP(cfg, tp)

    def forward(self, xn: torch.Tensor, batch: ForwardBatch, cache: LayerCache, inv_freq: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mamba2(xn) and Attention(xn), both from one matmul of xn. On one rank both are returned, for the
        next norm to add (one kernel fewer); under TP their sum, all-reduced once, and None."""
        zxbcdt, q, k, v = self.in_proj(xn).split(self.in_proj_sizes, dim=-1)
        mamba, attn = self.mamba(zxbcdt, batch, cache), self.self_attn(q, k, v, batch, cache, inv_freq)
        return (mamba, attn) if self.tp.size == 1 else (self.tp.all_reduce(mamba + attn), None)


def shard_config(cfg: FalconH1Config, tp: TensorParallel) -> FalconH1Config:
    """The sizes one of tp.size ranks holds; ValueError naming what the model cannot be split by."""
    n = tp.size
    splits = [("num_attention_heads", cfg.num_attention_heads, False),
              ("num_key_value_heads", cfg.num_key_value_heads, True),  # replicable: fewer than n, n a multiple
              ("mamba_n_heads", cfg.mamba_n_heads, False), ("mamba_n_groups", cfg.mamba_n_groups, True),
              ("intermediate_size", cfg.intermediate_size, False)]
    for name, count, replicable in splits:
        if count % n and not (replicable and n % count == 0):
            raise ValueError(f"tensor_parallel_size {n} cannot split this model: its {name} ({count}) is not "
                             f"divisible by {n}" + (f" (nor is {n} divisible by it)" if replicable else ""))
    return dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // n,
        num_key_value_heads=local_count(cfg.num_key_value_heads, tp),
        mamba_n_heads=cfg.mamba_n_heads // n, mamba_d_ssm=cfg.mamba_d_ssm // n,
        mamba_n_groups=local_count(cfg.mamba_n_groups, tp), intermediate_size=cfg.intermediate_size // n)


class FalconH1Model(nn.Module):
    def __init__(self, cfg: FalconH1Config, tp: TensorParallel, norm_ranks: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, padded_vocab_size(cfg.vocab_size, tp.size),
                                                   cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, norm_ranks) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class FalconH1ForCausalLM(nn.Module):
    shard_config = staticmethod(shard_config)

    def __init__(self, cfg: FalconH1Config, tp: TensorParallel = SINGLE):
        """cfg: the checkpoint's config; the modules are built at this rank's sizes (rank_cfg)."""
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.rank_cfg = shard_config(cfg, tp)
        self.model = FalconH1Model(self.rank_cfg, tp, max(tp.size // cfg.mamba_n_groups, 1))
        # Even when tied, the head is its own tensor: it carries lm_head_multiplier, the embedding another.
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, padded_vocab_size(cfg.vocab_size, tp.size), tp)
        D = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D)),
                             persistent=False)

    def forward(self, batch: ForwardBatch, caches: list[LayerCache]) -> torch.Tensor:
        """Returns the final hidden states [S, d] of the rows in batch.logits_indices."""
        h = self.model.embed_tokens(batch.input_ids)
        residual, delta = h, None
        for layer, cache in zip(self.model.layers, caches):
            if delta is None:
                xn = layer.input_layernorm(h)
            else:  # h = h + MLP output of the previous layer, fused with this layer's input norm
                norm = layer.input_layernorm
                xn, residual = ops.add_rms_norm(delta, residual, norm.weight, norm.eps)
            mamba, attn = layer(xn, batch, cache, self.inv_freq)  # h = h + Mamba2(xn) + Attention(xn), in the norm
            norm = layer.pre_ff_layernorm
            xn, residual = ops.add_rms_norm(mamba, residual, norm.weight, norm.eps, attn)
            delta = layer.feed_forward(xn)
        idx = batch.logits_indices
        norm = self.model.final_layernorm
        return ops.add_rms_norm(delta[idx], residual[idx], norm.weight, norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def finalize_weights(self) -> None:
        """Once loaded: A = -exp(A_log) computed once rather than every step."""
        for layer in self.model.layers:
            layer.mamba.register_buffer("A", -torch.exp(layer.mamba.A_log.float()), persistent=False)

    def checkpoint_names(self) -> set[str]:
        names = checkpoint_names(self)
        return names - {"lm_head.weight"} if self.cfg.tie_word_embeddings else names

    def lora_targets(self) -> list[str]:
        """The projections an adapter may change; a fused one carries a slice per checkpoint module in it."""
        projections = ["in_proj", "mamba.out_proj", "self_attn.o_proj", "feed_forward.gate_up_proj",
                       "feed_forward.down_proj"]
        return [f"model.layers.{i}.{p}" for i in range(self.cfg.num_hidden_layers) for p in projections]

    def lora_multiplier(self, module: str) -> float | torch.Tensor | None:
        """What load_transform folds into this module's weight (m_out * m_in); an adapter's delta gets the same."""
        multipliers = self._linear_multipliers(module + ".weight")
        return None if multipliers is None else multipliers[0]

    def load_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Maps one checkpoint tensor (fp32) to the parameters it fills, with the multipliers folded in."""
        cfg = self.cfg
        n = self.tp.size
        if name == "model.embed_tokens.weight":
            embedding = tensor * cfg.embedding_multiplier
            out = [(name, pad_vocab_rows(embedding, n) if n > 1 else embedding)]  # split evenly: padded
            if cfg.tie_word_embeddings:
                out.append(("lm_head.weight", pad_vocab_rows(tensor * cfg.lm_head_multiplier, n)))
            return out
        if name == "lm_head.weight":
            return [] if cfg.tie_word_embeddings else [(name, pad_vocab_rows(tensor * cfg.lm_head_multiplier, n))]
        multipliers = self._linear_multipliers(name)
        if multipliers is None:
            return [(name, tensor)]
        weight_m, bias_m = multipliers  # a number, or one per output row
        kind = name.rsplit(".", 1)[-1]
        if kind == "weight" and tensor.dtype != torch.float8_e4m3fn:
            return [(name, tensor * (weight_m[:, None] if torch.is_tensor(weight_m) else weight_m))]
        # Quantized weights keep their codes; the scales carry the multipliers, per output row: GPTQ `scales`
        # [groups, out]; `weight_scale` [out, 1 or groups] (FP8 per row, compressed-tensors), or one for all.
        if kind == "scales":
            return [(name, tensor * weight_m)]
        if kind == "weight_scale" and tensor.dim() == 2:
            return [(name, tensor * (weight_m[:, None] if torch.is_tensor(weight_m) else weight_m))]
        if kind == "weight_scale":
            return [(name, tensor.reshape(-1) * weight_m)]
        if kind == "bias":
            return [(name, tensor * bias_m)]
        return [(name, tensor)]  # GPTQ qweight, qzeros, g_idx (and their compressed-tensors names); FP8 codes

    def shard_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a (multiplier-folded) checkpoint tensor."""
        return shard_checkpoint_tensor(self.tp_layout(), name, tensor, self.tp)

    def tp_layout(self) -> dict:
        """How each tensor splits over the ranks: (dim, segments of (units, rows per unit)) along which
        the units (heads, groups, channels) are dealt out; ROW_PARALLEL_BIAS; not listed: replicated."""
        c = self.cfg
        heads, kv_heads = (c.num_attention_heads, c.head_dim), (c.num_key_value_heads, c.head_dim)
        ssm_heads, groups = (c.mamba_n_heads, c.mamba_d_head), (c.mamba_n_groups, c.mamba_d_state)
        per_head, ffn = (c.mamba_n_heads, 1), (c.intermediate_size, 1)
        vocab = (0, [(padded_vocab_size(c.vocab_size, self.tp.size), 1)])
        layout = {
            "model.embed_tokens.weight": vocab, "lm_head.weight": vocab,
            "self_attn.q_proj.weight": (0, [heads]), "self_attn.q_proj.bias": (0, [heads]),
            "self_attn.o_proj.weight": (1, [heads]), "self_attn.o_proj.bias": ROW_PARALLEL_BIAS,
            "mamba.in_proj.weight": (0, [ssm_heads, ssm_heads, groups, groups, per_head]),  # z | x | B | C | dt
            "mamba.conv1d.weight": (0, [ssm_heads, groups, groups]),  # x | B | C
            "mamba.dt_bias": (0, [per_head]), "mamba.A_log": (0, [per_head]), "mamba.D": (0, [per_head]),
            "mamba.norm.weight": (0, [ssm_heads]),
            "mamba.out_proj.weight": (1, [ssm_heads]), "mamba.out_proj.bias": ROW_PARALLEL_BIAS,
            "feed_forward.down_proj.weight": (1, [ffn]), "feed_forward.down_proj.bias": ROW_PARALLEL_BIAS,
        }
        for proj in ("k_proj", "v_proj"):
            layout |= {f"self_attn.{proj}.weight": (0, [kv_heads]), f"self_attn.{proj}.bias": (0, [kv_heads])}
        for proj in ("gate_proj", "up_proj"):
            layout |= {f"feed_forward.{proj}.weight": (0, [ffn]), f"feed_forward.{proj}.bias": (0, [ffn])}
        layout["mamba.in_proj.bias"] = layout["mamba.in_proj.weight"]
        layout["mamba.conv1d.bias"] = layout["mamba.conv1d.weight"]
        return layout

    def _linear_multipliers(self, name: str) -> tuple | None:
        """(weight, bias) multipliers of the linear layer `name` belongs to. Input-side scales (x * s before
        the layer) scale only the weight; output-side ones both."""
        cfg = self.cfg
        if ".self_attn.q_proj." in name or ".self_attn.v_proj." in name:
            return cfg.attention_in_multiplier, 1.0
        if ".self_attn.k_proj." in name:
            return cfg.attention_in_multiplier * cfg.key_multiplier, cfg.key_multiplier
        if ".self_attn.o_proj." in name:
            return cfg.attention_out_multiplier, cfg.attention_out_multiplier
        if ".mamba.in_proj." in name:
            rows = self._ssm_row_multipliers()
            return rows * cfg.ssm_in_multiplier, rows
        if ".mamba.out_proj." in name:
            return cfg.ssm_out_multiplier, cfg.ssm_out_multiplier
        if ".feed_forward.gate_proj." in name:
            return cfg.mlp_multipliers[0], cfg.mlp_multipliers[0]
        if ".feed_forward.down_proj." in name:
            return cfg.mlp_multipliers[1], cfg.mlp_multipliers[1]
        return None

    def _ssm_row_multipliers(self) -> torch.Tensor:
        """ssm_multipliers m0..m4 expanded over the in_proj rows [z | x | B | C | dt]."""
        cfg = self.cfg
        gn = cfg.mamba_n_groups * cfg.mamba_d_state
        sizes = [cfg.mamba_d_ssm, cfg.mamba_d_ssm, gn, gn, cfg.mamba_n_heads]
        return torch.cat([torch.full((n,), m) for n, m in zip(sizes, cfg.ssm_multipliers)])
