"""The ops layer: what models call. Each op runs its Triton kernel on CUDA and its torch reference
elsewhere (kernels/<op>.py holds both), and splits the flat batch into its decode and prefill parts."""

from __future__ import annotations

import torch

from engine.forward_batch import ForwardBatch
from kernels.attention import paged_attention_ref, write_kv_ref
from kernels.conv1d import causal_conv1d_update_ref, causal_conv1d_varlen_ref
from kernels.norm import add_rms_norm_ref, gated_rms_norm_ref, rms_norm_ref
from kernels.rope import rope_ref
from kernels.selective_scan import selective_scan_update_ref, selective_scan_varlen_ref
from kernels.ssd_scan import ssd_scan_varlen_ref
from kernels.ssm_state_update import ssm_state_update_ref

rms_norm = rms_norm_ref
add_rms_norm = add_rms_norm_ref
gated_rms_norm = gated_rms_norm_ref
rope = rope_ref


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              batch: ForwardBatch, scale: float) -> torch.Tensor:
    """Writes the new k, v [T, Hkv, D] into their pages, then attends q [T, Hq, D] over each sequence."""
    write_kv_ref(k, v, k_cache, v_cache, batch.slot_mapping)
    return paged_attention_ref(q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                               scale)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_states: torch.Tensor,
                  batch: ForwardBatch) -> torch.Tensor:
    """SiLU(causal depthwise conv) of x [T, C] continuing each sequence's conv state."""
    nd = batch.num_decodes
    out = torch.empty_like(x)
    if nd:
        out[:nd] = causal_conv1d_update_ref(x[:nd], weight, bias, conv_states, batch.state_slots[:nd])
    if batch.num_prefill_seqs:
        out[nd:] = causal_conv1d_varlen_ref(x[nd:], weight, bias, conv_states, batch.prefill_query_start_loc(),
                                            batch.state_slots[nd:], batch.has_initial_state[nd:])
    return out


def mamba2_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float], ssm_states: torch.Tensor,
                batch: ForwardBatch, chunk_size: int) -> torch.Tensor:
    """Mamba2 SSM over x [T, H, P]: state update for decodes, chunked scan for prefills."""
    nd = batch.num_decodes
    y = torch.empty_like(x)
    if nd:
        y[:nd] = ssm_state_update_ref(x[:nd], dt[:nd], A, B[:nd], C[:nd], D, dt_bias, dt_limit, ssm_states,
                                      batch.state_slots[:nd])
    if batch.num_prefill_seqs:
        y[nd:] = ssd_scan_varlen_ref(x[nd:], dt[nd:], A, B[nd:], C[nd:], D, dt_bias, dt_limit, ssm_states,
                                     batch.prefill_query_start_loc(), batch.state_slots[nd:],
                                     batch.has_initial_state[nd:], chunk_size)
    return y


def mamba1_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor, z: torch.Tensor, ssm_states: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
    """Mamba1 SSM over x [T, C], gated by SiLU(z): step for decodes, varlen scan for prefills."""
    nd = batch.num_decodes
    y = torch.empty_like(x)
    if nd:
        y[:nd] = selective_scan_update_ref(x[:nd], dt[:nd], A, B[:nd], C[:nd], D, dt_bias, z[:nd], ssm_states,
                                           batch.state_slots[:nd])
    if batch.num_prefill_seqs:
        y[nd:] = selective_scan_varlen_ref(x[nd:], dt[nd:], A, B[nd:], C[nd:], D, dt_bias, z[nd:], ssm_states,
                                           batch.prefill_query_start_loc(), batch.state_slots[nd:],
                                           batch.has_initial_state[nd:])
    return y
