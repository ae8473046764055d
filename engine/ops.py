"""The ops layer: what models call. Each op runs its Triton kernel on CUDA and its torch reference
elsewhere (kernels/<op>.py or kernels/<op>/ holds both, same signature), and splits the flat batch into
its decode and prefill parts. FALCON_SERVE_TORCH_OPS=1 forces the references everywhere (for debugging)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_batch import ForwardBatch
from kernels import activation, conv1d, norm, selective_scan, ssd_scan, ssm_state_update
from kernels import attention as attention_kernels
from kernels import fp8_linear as fp8_kernels
from kernels import gemv as gemv_kernels
from kernels import lora as lora_kernels
from kernels import quant_linear as gptq_kernels
from kernels import rope as rope_kernels

_FORCE_TORCH = os.environ.get("FALCON_SERVE_TORCH_OPS") == "1"


def _impl(module, name: str, x: torch.Tensor):
    """The Triton kernel `name` of a kernels module on CUDA, else its `<name>_ref` reference."""
    if x.is_cuda and not _FORCE_TORCH and hasattr(module, name):
        return getattr(module, name)
    return getattr(module, name + "_ref")


def _split_by_phase(x: torch.Tensor, batch: ForwardBatch, decode, prefill) -> torch.Tensor:
    """decode(x[:num_decodes]) and prefill(x[num_decodes:]) side by side; no copy when one part is empty."""
    nd = batch.num_decodes
    if batch.num_prefill_seqs == 0:
        return decode(x)
    if nd == 0:
        return prefill(x)
    return torch.cat([decode(x[:nd]), prefill(x[nd:])])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _impl(norm, "rms_norm", x)(x, weight, eps)


def split_rms_norm(x: torch.Tensor, sizes: list[int], eps: float) -> torch.Tensor:
    """Weightless RMSNorm of each column segment of x [T, sum(sizes)], all in one pass."""
    return _impl(norm, "split_rms_norm", x)(x, sizes, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 x2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h), h) with h = residual + x, or residual + (x + x2) when a second delta is given."""
    return _impl(norm, "add_rms_norm", x)(x, residual, weight, eps, x2)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, n_groups: int,
                   norm_before_gate: bool) -> torch.Tensor:
    return _impl(norm, "gated_rms_norm", y)(y, z, weight, eps, n_groups, norm_before_gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _impl(activation, "silu_mul", gate)(gate, up)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE on q [T, Hq, D] and k [T, Hkv, D]; the rotated k and v go into their pages. Returns the rotated q,
    and when the batch has prefill rows the rotated k and v [2, T, Hkv, D] too, contiguous (None otherwise), for
    paged_attention to read the new tokens' K / V densely."""
    kv_out = torch.empty(2, *k.shape, dtype=k.dtype, device=k.device) if batch.num_prefill_seqs else None
    q = _impl(rope_kernels, "rope_write_kv", q)(q, k, v, batch.positions, inv_freq, k_cache, v_cache,
                                                batch.slot_mapping, kv_out=kv_out)
    return q, kv_out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           gemv_max_weights: float = gemv_kernels.GEMV_MAX_WEIGHTS) -> torch.Tensor:
    """x [T, K] @ W^T + bias for a 16-bit weight: one row on CUDA through the Triton GEMV where the H200
    measured it faster than cuBLAS (kernels/gemv.py gemv_faster), else F.linear."""
    if x.is_cuda and not _FORCE_TORCH and gemv_kernels.gemv_faster(x, weight, gemv_max_weights):
        return gemv_kernels.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


FUSED_SILU_MUL_MAX_WEIGHTS = 1 << 25  # 16-bit and FP8 GEMVs compute SiLU(gate) * up themselves below (silu_mul_linear)


def silu_mul_linear(gate_up: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(SiLU(gate) * up) for gate_up = [gate | up] [T, 2K] (SwiGLU's down projection). One row on CUDA whose
    matmul is a Triton GEMV computes SiLU(gate) * up as the GEMV loads x, so the silu_mul launch disappears: GPTQ's
    at any size, 16-bit (where `linear` picks the GEMV) and FP8 ones below 2^25 weights. Above, fusing costs more
    than the launch, since each program recomputes all of x's SiLU * mul for its few rows of W (H200,
    benchmarks/decode_tail.py --cases mlp, us a layer, fused against silu_mul first: the 7B's down 25.3 / 22.1 in
    bf16, 29.1 / 14.2 in FP8, 13.0 / 13.1 GPTQ-Int4; the 0.5B's 2.5 / 3.0 bf16, 4.2 / 4.9 FP8; RESULTS.md session
    15). Otherwise (more rows, a layer wrapped for LoRA, the references) silu_mul, then the layer."""
    if gate_up.is_cuda and not _FORCE_TORCH and gate_up.shape[0] == 1:
        method = getattr(layer, "method", None)  # quantized layers' (engine/quantization); 16-bit: an nn.Linear
        if method == "gptq" and layer.separate_parts is None:
            return gptq_kernels.gptq_linear(gate_up, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bias,
                                            layer.bits, layer.group_size, layer.out_features, silu_mul=True)
        small = (method == "fp8" or isinstance(layer, nn.Linear)) and layer.weight.numel() < FUSED_SILU_MUL_MAX_WEIGHTS
        if small and method == "fp8":
            return fp8_kernels.fp8_weight_only_linear(gate_up, layer.weight, layer.weight_scale, layer.bias,
                                                      silu_mul=True)
        if small and gemv_kernels.gemv_faster(gate_up, layer.weight):
            return gemv_kernels.gemv(gate_up, layer.weight, layer.bias, silu_mul=True)
    gate, up = gate_up.chunk(2, dim=-1)
    return layer(silu_mul(gate, up))


def lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear without the GEMV's size limit: at one row it beats cuBLAS at every vocabulary (H200,
    benchmarks/gemv.py: the Falcon-H1-7B head 187 against 220 us, FalconMamba's 130 against 148)."""
    return linear(x, weight, None, gemv_max_weights=float("inf"))


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x [T, K] @ W^T + bias for a quantized linear layer (engine/quantization): GPTQ (qweight, scales,
    zeros, perm, bits, group_size) or FP8 (weight, weight_scale)."""
    if layer.method == "fp8":
        return _impl(fp8_kernels, "fp8_linear", x)(x, layer.weight, layer.weight_scale, layer.bias)
    return _impl(gptq_kernels, "gptq_linear", x)(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.bias,
                                                 layer.bits, layer.group_size, layer.out_features)


def lora_delta(x: torch.Tensor, out: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
               slice_starts: torch.Tensor, widest: int, rows: lora_kernels.LoRARows) -> torch.Tensor:
    """out [T, N] += each row's adapter delta (x A^T) B^T per output slice, in place; rows without an adapter
    unchanged (kernels/lora.py)."""
    h = _impl(lora_kernels, "lora_shrink", x)(x, a_stack, rows)
    return _impl(lora_kernels, "lora_expand", x)(h, b_stack, slice_starts, widest, rows, out)


def lora_expand(h_all: torch.Tensor, out: torch.Tensor, b_stack: torch.Tensor, slice_starts: torch.Tensor,
                widest: int, rows: lora_kernels.LoRARows) -> torch.Tensor:
    """out [T, N] += each row's B h per output slice, in place, where h_all [T, L*S*R] holds x A^T of every
    slot (computed with the base matmul, kernels/lora.py); rows without an adapter unchanged."""
    return _impl(lora_kernels, "lora_expand", out)(h_all.unsqueeze(0), b_stack, slice_starts, widest, rows, out,
                                                   slot_stride=h_all.shape[1] // b_stack.shape[0])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                    scale: float, new_kv: torch.Tensor | None = None) -> torch.Tensor:
    """Attends q [T, Hq, D] over each sequence's cached tokens, its new ones included; new_kv [2, T, Hkv, D]
    (the new tokens' K and V, already in the pages too: rope_write_kv's) lets the prefill read those densely."""
    new_k, new_v = (None, None) if new_kv is None else new_kv
    return _impl(attention_kernels, "paged_attention", q)(
        q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, scale,
        batch.num_decodes, batch.max_query_len, batch.max_seq_len, new_k=new_k, new_v=new_v)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_states: torch.Tensor,
                  batch: ForwardBatch) -> torch.Tensor:
    """SiLU(causal depthwise conv) of x [T, C] continuing each sequence's conv state."""

    def decode(x):
        return _impl(conv1d, "causal_conv1d_update", x)(x, weight, bias, conv_states, batch.decode_state_slots)

    def prefill(x):
        return _impl(conv1d, "causal_conv1d_varlen", x)(x, weight, bias, conv_states, batch.prefill_query_start_loc,
                                                        batch.prefill_state_slots, batch.prefill_has_initial_state)

    return _split_by_phase(x, batch, decode, prefill)


def mamba2_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float], ssm_states: torch.Tensor,
                batch: ForwardBatch, chunk_size: int) -> torch.Tensor:
    """Mamba2 SSM over x [T, H, P]: state update for decodes, chunked scan for prefills."""
    nd = batch.num_decodes

    def decode(x):
        return _impl(ssm_state_update, "ssm_state_update", x)(
            x, dt[:nd], A, B[:nd], C[:nd], D, dt_bias, dt_limit, ssm_states, batch.decode_state_slots)

    def prefill(x):
        return _impl(ssd_scan, "ssd_scan_varlen", x)(
            x, dt[nd:], A, B[nd:], C[nd:], D, dt_bias, dt_limit, ssm_states, batch.prefill_query_start_loc,
            batch.prefill_state_slots, batch.prefill_has_initial_state, chunk_size)

    return _split_by_phase(x, batch, decode, prefill)


def mamba1_decode_step(x: torch.Tensor, dt: torch.Tensor, dlBC: torch.Tensor, eps: float, A: torch.Tensor,
                       D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor, ssm_states: torch.Tensor,
                       batch: ForwardBatch) -> torch.Tensor:
    """A decode-only step's FalconMamba SSM from the raw x_proj row dlBC and dt = W_dt dl of the raw dl: the
    weightless dl / B / C norms inside the state update (kernels/selective_scan.py)."""
    return _impl(selective_scan, "selective_scan_update_bcdt_norm", x)(x, dt, dlBC, eps, A, D, dt_bias, z,
                                                                       ssm_states, batch.state_slots)


def mamba1_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor, ssm_states: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
    """Mamba1 SSM over x [T, C], gated by SiLU(z): step for decodes, varlen scan for prefills."""
    nd = batch.num_decodes

    def decode(x):
        return _impl(selective_scan, "selective_scan_update", x)(
            x, dt[:nd], A, B[:nd], C[:nd], D, dt_bias, z[:nd], ssm_states, batch.decode_state_slots)

    def prefill(x):
        return _impl(selective_scan, "selective_scan_varlen", x)(
            x, dt[nd:], A, B[nd:], C[nd:], D, dt_bias, z[nd:], ssm_states, batch.prefill_query_start_loc,
            batch.prefill_state_slots, batch.prefill_has_initial_state)

    return _split_by_phase(x, batch, decode, prefill)
