"""Programmatic dependent launch (kernels/pdl.py): off where unsupported; on a device, PDL changes no result.

GPU tests: a decode-like chain of every one-sequence kernel (16-bit, FP8 and GPTQ GEMVs with split-K, the 16-bit
one with SiLU*mul in its loads, norms, conv and both state updates in place, RoPE + KV write, split attention
(2 splits) and its reduce kernel, SiLU*mul) replayed from one
CUDA graph with PDL on and one with it off must leave bit-identical outputs and states; and the engine's
greedy tokens and logprobs (decode graphs, both model families) must be identical with it on and off.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import capture_graph
from kernels import activation, attention, conv1d, norm, pdl, rope, selective_scan, ssm_state_update
from kernels.fp8_linear import fp8_weight_only_linear, quantize_fp8_weight
from kernels.fp8_linear import gemv_config as fp8_gemv_config
from kernels.gemv import gemv, gemv_config
from kernels.quant_linear import gptq_linear
from tests.kernels.test_quant_linear import random_gptq
from tests.tiny_models import GPU_TEST_MEMORY


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU / interpreter case")
def test_pdl_is_off_on_cpu_and_in_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it without a GPU
    assert not pdl.supported(torch.device("cpu"))
    assert not pdl.supported(torch.device("cuda"))  # the interpreter runs no PTX, whatever the device says
    assert pdl.launch_kwargs(torch.device("cpu")) == dict(USE_PDL=False)


def test_the_switch_is_read_from_the_environment():
    env = {**os.environ, "FALCON_SERVE_PDL": "0"}
    out = subprocess.run([sys.executable, "-c", "import kernels.pdl as p; print(p.ENABLED)"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_disabled_means_no_pdl_keywords(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pdl.launch_kwargs(device) == dict(USE_PDL=False)


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                  reason="PDL needs sm_90+")


@pytest.mark.gpu
@needs_hopper
def test_pdl_is_on_for_hopper():
    """Fails where the device's Triton lacks gdc_wait or launch_pdl (then PDL would silently stay off)."""
    assert pdl.enabled(torch.device("cuda")) == pdl.ENABLED
    assert pdl.supported(torch.device("cuda"))


def chain_inputs(dtype: torch.dtype, device: str = "cuda") -> dict:
    """Weights, states and step inputs of decode_chain (one sequence, slot 0, position 300)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    d, N, H, P = 1024, 16, 32, 32
    fp8_w, fp8_scale = quantize_fp8_weight(randn(d, d, scale=0.03, dt=torch.float32))
    qweight, scales, zeros, perm, _ = random_gptq(d, d, 4, 128, True, dtype)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(
        h=randn(1, d), residual=randn(1, d), norm_w=randn(d, scale=0.1) + 1, w16=randn(d, d, scale=0.03),
        w_gate_up=randn(2 * d, d, scale=0.03),
        conv_w=randn(d, 4, scale=0.5), conv_b=randn(d, scale=0.1), conv_states=randn(2, d, 3),
        A1=-torch.rand(d, N, generator=g, device=device) - 0.1, B1=randn(1, N), C1=randn(1, N), D1=randn(d),
        dt_bias1=randn(d, scale=0.1), states1=randn(2, d, N, dt=torch.float32),
        A2=-torch.rand(H, generator=g, device=device) - 0.1, B2=randn(1, 1, N), C2=randn(1, 1, N), D2=randn(H),
        dt_bias2=randn(H, scale=0.1), states2=randn(2, H, P, N, dt=torch.float32), slots=torch.tensor([0], **i32),
        fp8_w=fp8_w, fp8_scale=fp8_scale, gptq=(qweight, scales, zeros, perm),
        k_cache=randn(32, 16, 2, 128), v_cache=randn(32, 16, 2, 128),
        positions=torch.tensor([300], device=device), slot_mapping=torch.tensor([300], device=device),
        inv_freq=1.0 / 10000 ** (torch.arange(0, 128, 2, device=device).float() / 128),
        block_tables=torch.arange(32, **i32)[None], seq_lens=torch.tensor([301], **i32),
        query_start_loc=torch.tensor([0, 1], **i32), gate_w=randn(d, scale=0.1) + 1)


HALF2_CONFIG = dict(kind="gemv_half2", BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=2, num_stages=1)


def decode_chain(p: dict, layers: int = 3) -> tuple[torch.Tensor, ...]:
    """Each kernel reads the one before it; states, KV pages and the residual pass from layer to layer."""
    h, residual, attn = p["h"], p["residual"], None
    d = h.shape[1]
    for _ in range(layers):
        n, residual = norm.add_rms_norm(h, residual, p["norm_w"], 1e-5, attn)
        gate_up = gemv(n, p["w_gate_up"])
        a = gemv(gate_up, p["w16"], config=gemv_config(d, d, n.device, num_warps=1), silu_mul=True)  # split-K
        c = conv1d.causal_conv1d_update(a, p["conv_w"], p["conv_b"], p["conv_states"], p["slots"])
        s = selective_scan.selective_scan_update(c, a, p["A1"], p["B1"], p["C1"], p["D1"], p["dt_bias1"], n,
                                                 p["states1"], p["slots"])
        m = ssm_state_update.ssm_state_update(s.view(1, 32, 32), c[:, :32], p["A2"], p["B2"], p["C2"], p["D2"],
                                              p["dt_bias2"], (0.0, math.inf), p["states2"], p["slots"]).view(1, d)
        m = norm.gated_rms_norm(m, a, p["gate_w"], 1e-5, 4, False)
        q = rope.rope_write_kv(a.view(1, 8, 128), n[:, :256].view(1, 2, 128), m[:, :256].view(1, 2, 128),
                               p["positions"], p["inv_freq"], p["k_cache"], p["v_cache"], p["slot_mapping"])
        attn = attention.paged_attention(q, p["k_cache"], p["v_cache"], p["query_start_loc"], p["seq_lens"],
                                         p["block_tables"], 128 ** -0.5, 1, 1, 512).view(1, d)
        f = fp8_weight_only_linear(activation.silu_mul(m, attn), p["fp8_w"], p["fp8_scale"], None,
                                   config=fp8_gemv_config(d, d, 4, 1, 4, n.device))
        f = gptq_linear(f, *p["gptq"], None, 4, 128)  # the fp32 GEMV at this size
        f = gptq_linear(f, *p["gptq"], None, 4, 128, config=HALF2_CONFIG)  # and its separate gather launch
        h = norm.rms_norm(f, p["norm_w"], 1e-5)
    return h, residual, attn


def chain_graph(p: dict, enabled: bool, monkeypatch) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    monkeypatch.setattr(pdl, "ENABLED", enabled)
    return capture_graph(lambda: decode_chain(p), torch.cuda.graph_pool_handle(), 1)


@pytest.mark.gpu
@needs_hopper
def test_decode_chain_graph_same_with_and_without_pdl(monkeypatch):
    """20 replays (states advancing in place) of each graph from the same start: every output and state equal
    to the bit. A dependent overtaking its predecessor would show here as a difference."""
    p = chain_inputs(torch.bfloat16)
    mutable = ("conv_states", "states1", "states2", "k_cache", "v_cache")
    start = {k: p[k].clone() for k in mutable}
    results = []
    for enabled in (True, False):
        graph, outs = chain_graph(p, enabled, monkeypatch)
        for k in mutable:
            p[k].copy_(start[k])
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        results.append([t.clone() for t in outs] + [p[k].clone() for k in mutable])
    assert all(torch.isfinite(t.float()).all() for t in results[0])
    for on, off in zip(*results):
        assert torch.equal(on, off)


PROMPTS = [[5 + (11 * i + 5 * j) % 250 for j in range(3 + 9 * i)] for i in range(4)]


def greedy_with_logprobs(directory, enabled: bool, monkeypatch) -> list:
    """One sequence alone, then four together: each's tokens and top-5 logprobs at every step."""
    monkeypatch.setattr(pdl, "ENABLED", enabled)
    llm = LLM(str(directory), device="cuda", dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=64,
              max_model_len=256, gpu_memory_utilization=GPU_TEST_MEMORY)
    assert llm.engine.runner.graphs is not None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS[:1], params) + llm.generate(PROMPTS, params)
    del llm
    torch.cuda.empty_cache()
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_engine_decode_same_with_and_without_pdl(request, fixture, monkeypatch):
    """bf16 (so the 16-bit GEMVs run) through the decode graphs: identical tokens and logprobs."""
    directory = request.getfixturevalue(fixture)
    assert greedy_with_logprobs(directory, True, monkeypatch) == greedy_with_logprobs(directory, False, monkeypatch)
