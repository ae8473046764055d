"""The engine's decode steps through the fused decode kernels themselves (the norm that adds two deltas,
FalconMamba's state update with its norms), run by Triton's interpreter on CPU at the tiny models' shapes: the
tokens stay transformers' greedy ones and the logprobs close to them. (On CPU the ops layer runs the torch
references; here it is made to pick the kernels, as it does on CUDA.)"""

from __future__ import annotations

import collections

import pytest

from engine import LLM, SamplingParams, ops
from tests.tiny_models import reference_greedy

FUSED = ("add_rms_norm", "selective_scan_update_bcdt_norm")
PROMPTS = [[5, 17, 33, 2, 90], [7] * 3, list(range(40, 52))]


@pytest.fixture
def fused_kernels_on_cpu(monkeypatch):
    """ops picks the Triton kernel of the fused ops whatever the device; counts their calls."""
    real_impl, calls = ops._impl, collections.Counter()

    def impl(module, name, x):
        if name not in FUSED:
            return real_impl(module, name, x)
        kernel = getattr(module, name)

        def counted(*args):
            calls[name] += 1
            return kernel(*args)

        return counted

    monkeypatch.setattr(ops, "_impl", impl)
    return calls


@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_decode_through_the_fused_kernels_matches_transformers(request, fixture, fused_kernels_on_cpu):
    directory = request.getfixturevalue(fixture)
    llm = LLM(str(directory), device="cpu", dtype="float32", max_num_seqs=3, enforce_eager=True)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    outputs = llm.generate(PROMPTS, params)
    if fixture == "h1_dir":
        assert fused_kernels_on_cpu["add_rms_norm"] > 0
    else:
        assert fused_kernels_on_cpu["selective_scan_update_bcdt_norm"] > 0
    for prompt, out in zip(PROMPTS, outputs):
        tokens, logprobs = reference_greedy(directory, prompt, 5, logprobs=True)
        assert out.outputs[0].token_ids == tokens
        ours = [entry[token] for entry, token in zip(out.outputs[0].logprobs, tokens)]
        assert max(abs(a - b) for a, b in zip(ours, logprobs)) < 1e-3
