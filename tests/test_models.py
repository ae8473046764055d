"""Our Falcon-H1 and FalconMamba against transformers on the same tiny random checkpoints (fp32, CPU):
greedy tokens equal, logprobs within 1e-4, whether the prompt is prefilled at once or in chunks."""

import json

import pytest
import torch

from engine import LLM, SamplingParams
from tests.tiny_models import build_checkpoint, falcon_h1_config, falcon_mamba_config, reference_greedy

PROMPTS = [[5, 40, 70, 100, 33, 8, 90, 120, 77, 66, 10, 11, 12, 13, 200, 150, 44],
           [7, 250, 3],
           [9]]
MAX_TOKENS = 8

H1_VARIANTS = {
    "groups2_rmsnorm_gate_then_norm": {},
    "groups1_no_rmsnorm": dict(mamba_n_groups=1, mamba_rms_norm=False),
    "norm_before_gate_tied": dict(mamba_norm_before_gate=True, tie_word_embeddings=True),
    "all_biases": dict(attention_bias=True, mlp_bias=True, mamba_proj_bias=True, projectors_bias=True,
                       mamba_n_groups=4, num_key_value_heads=1),
    # the fused in_proj + q/k/v has a bias on the attention rows only (zeros on Mamba's)
    "attention_bias_only": dict(attention_bias=True),
    "no_conv_bias_head_dim_32": dict(mamba_conv_bias=False, head_dim=32, mamba_d_state=8, mamba_chunk_size=4),
}
MAMBA_VARIANTS = {
    "falcon_mamba_untied": falcon_mamba_config(),
    "falcon_mamba_tied": falcon_mamba_config(tie_word_embeddings=True, residual_in_fp32=False),
}


def check_against_transformers(directory, **engine_args):
    llm = LLM(str(directory), device="cpu", dtype="float32", **engine_args)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)
    outputs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        ref_tokens, ref_logprobs = reference_greedy(directory, prompt, MAX_TOKENS, logprobs=True)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens, f"prompt {prompt}"
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert ours == pytest.approx(ref_logprobs, abs=1e-4)
        assert all(len(lp) >= 3 for lp in completion.logprobs)
        assert completion.finish_reason == "length"
    return llm


@pytest.mark.parametrize("variant", H1_VARIANTS)
def test_falcon_h1_matches_transformers(tmp_path, variant):
    directory = build_checkpoint(tmp_path, falcon_h1_config(**H1_VARIANTS[variant]))
    check_against_transformers(directory)


@pytest.mark.parametrize("variant", MAMBA_VARIANTS)
def test_falcon_mamba_matches_transformers(tmp_path, variant):
    check_against_transformers(build_checkpoint(tmp_path, MAMBA_VARIANTS[variant]))


def test_plain_mamba_matches_transformers(tmp_path):
    from transformers import MambaConfig

    config = MambaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2, state_size=8,
                         time_step_rank=6, initializer_range=0.2, tie_word_embeddings=True, use_mambapy=False)
    check_against_transformers(build_checkpoint(tmp_path, config))


@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_chunked_prefill_equals_one_piece(request, fixture):
    """Prompts fed 3 tokens per step (state and KV carried across chunks) give transformers' result."""
    check_against_transformers(request.getfixturevalue(fixture), max_num_batched_tokens=3, kv_block_size=4)


def test_old_style_config_file(tmp_path):
    """The same weights under a config.json written the way older transformers wrote it."""
    directory = build_checkpoint(tmp_path, falcon_h1_config())
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw.update(rope_theta=rope["rope_theta"], torch_dtype=raw.pop("dtype"))
    path.write_text(json.dumps(raw).replace('{"__float__": "Infinity"}', "Infinity"))
    assert "Infinity" in path.read_text() and "rope_parameters" not in path.read_text()
    check_against_transformers(directory)


def test_bfloat16_keeps_ssm_parameters_fp32(h1_dir):
    llm = LLM(str(h1_dir), device="cpu", dtype="bfloat16")
    model = llm.engine.runner.model
    mixer = model.model.layers[0].mamba
    assert model.model.layers[0].in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert llm.engine.runner.caches[0].ssm_state.dtype == torch.float32
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("fixture", ["h1_dir", "mamba_dir"])
def test_lm_head_rows_padded_to_128_and_sliced_off(request, fixture):
    """The head holds 384 rows for the 300-token vocabulary (the checkpoint's rows, then zeros); logits keep
    exactly the vocabulary's 300 columns and equal the unpadded product."""
    model = LLM(str(request.getfixturevalue(fixture)), device="cpu", dtype="float32").engine.runner.model
    weight = model.lm_head.weight
    assert weight.shape[0] == 384
    assert torch.count_nonzero(weight[300:]) == 0 and torch.count_nonzero(weight[:300].abs().sum(1)) == 300
    hidden = torch.randn(5, weight.shape[1])
    logits = model.compute_logits(hidden)
    assert logits.shape == (5, 300) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden @ weight[:300].t())
