"""Quantized weights end to end (CPU, float32): GPTQ checkpoints in the published layout (tests/gptq_checkpoints.py),
FP8 checkpoints (vLLM's `fp8` and compressed-tensors' `float-quantized` formats) and --quantization fp8, each against
transformers run on the dequantized weights of the same model.

Greedy tokens must be equal and logprobs within 2e-4: both sides compute in float32 from the same
dequantized values (our multipliers fold into the scales, transformers applies them at run time, which
moves results by float32 rounding only). Also: config fields are checked, unsupported ones named in
the error; projections that read one input stay fused; the memory plan counts the packed sizes.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineArgs, parse_model_config
from engine.loader import LoadError, model_weight_bytes
from engine.quantization import FP8Config, GPTQConfig
from engine.quantization.fp8 import FP8Linear
from engine.quantization.gptq import GPTQLinear, pack_int32_rows, unpack_int32
from tests.gptq_checkpoints import (
    pack_along_cols,
    pack_along_rows,
    write_awq,
    write_compressed_tensors_int,
    write_fp8_checkpoint,
    write_fp8_reference,
    write_gptq,
)
from tests.tiny_models import GPU_TEST_MEMORY, build_checkpoint, falcon_h1_config, falcon_mamba_config, reference_greedy

PROMPTS = [[5, 40, 70, 100, 33, 8, 90, 120, 77, 66, 10, 11, 12, 13, 200, 150, 44], [7, 250, 3]]
MAX_TOKENS = 6
LOGPROB_TOL = 2e-4

# In-features >= 128 everywhere, so that group_size 128 is a real group (and 32 gives several).
H1_QUANT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16)
MAMBA_QUANT = dict(hidden_size=128, intermediate_size=256, state_size=8, time_step_rank=8)


@pytest.fixture(scope="module")
def h1_source(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("h1_src"), falcon_h1_config(**H1_QUANT))


@pytest.fixture(scope="module")
def h1_bias_source(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("h1_bias_src"), falcon_h1_config(
        **H1_QUANT, attention_bias=True, mlp_bias=True, mamba_proj_bias=True, projectors_bias=True))


@pytest.fixture(scope="module")
def mamba_source(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("mamba_src"), falcon_mamba_config(**MAMBA_QUANT))


def compare(directory, reference_dir, **engine_args) -> LLM:
    llm = LLM(str(directory), device="cpu", dtype="float32", **engine_args)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        ref_tokens, ref_logprobs = reference_greedy(reference_dir, prompt, MAX_TOKENS, logprobs=True)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens, f"prompt {prompt}"
        ours = [lp[t] for lp, t in zip(completion.logprobs, completion.token_ids)]
        assert ours == pytest.approx(ref_logprobs, abs=LOGPROB_TOL)
    return llm


def layers_of(llm: LLM, kind) -> list:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, kind)]


GPTQ_VARIANTS = {  # bits, group_size, desc_act, checkpoint_format, sym, shared_act_order
    "int4_g128_actorder_v1": (4, 128, True, "gptq", True, True),
    "int8_g128_actorder_v1": (8, 128, True, "gptq", True, True),
    "int4_g-1_v2": (4, -1, False, "gptq_v2", True, True),
    "int8_g32_asym_v2": (8, 32, False, "gptq_v2", False, True),
    "int4_g32_asym_actorder_per_layer_v1": (4, 32, True, "gptq", False, False),
}


@pytest.mark.parametrize("variant", GPTQ_VARIANTS)
def test_falcon_h1_gptq_matches_transformers_on_dequantized_weights(tmp_path, h1_source, h1_bias_source, variant):
    bits, group, act, fmt, sym, shared = GPTQ_VARIANTS[variant]
    source = h1_bias_source if variant.startswith("int8_g32") else h1_source
    write_gptq(source, tmp_path / "gptq", tmp_path / "plain", bits=bits, group_size=group, desc_act=act,
               checkpoint_format=fmt, sym=sym, shared_act_order=shared)
    llm = compare(tmp_path / "gptq", tmp_path / "plain")
    layers = layers_of(llm, GPTQLinear)
    assert layers and all(layer.bits == bits for layer in layers)
    # act-order reorders channels wherever a layer has several groups (down_proj's 256 inputs at least)
    assert any(layer.perm is not None for layer in layers) == (act and group != -1)
    separate = [layer for layer in layers if layer.separate_parts is not None]
    # in_proj + q + k + v and gate + up are one matmul each unless their act-order permutations differ
    assert len(separate) == (0 if shared else 2 * 2)
    assert all(len(layer.separate_parts) == len(layer.parts) for layer in separate)
    if shared:
        fused = llm.engine.runner.model.model.layers[0].in_proj
        assert isinstance(fused, GPTQLinear) and fused.out_features == 328 + 128 + 64 + 64
        assert fused.qweight.shape[1] == 640  # padded


@pytest.mark.parametrize("variant", ["int4_g128_actorder_v1", "int8_g-1_v2"])
def test_falcon_mamba_gptq_matches_transformers_on_dequantized_weights(tmp_path, mamba_source, variant):
    bits, group, act, fmt = {"int4_g128_actorder_v1": (4, 128, True, "gptq"), "int8_g-1_v2": (8, -1, False, "gptq_v2")}[
        variant]
    write_gptq(mamba_source, tmp_path / "gptq", tmp_path / "plain", bits=bits, group_size=group, desc_act=act,
               checkpoint_format=fmt)
    llm = compare(tmp_path / "gptq", tmp_path / "plain", quantization="gptq")
    assert len(layers_of(llm, GPTQLinear)) == 2 * 2  # in_proj and out_proj of both layers; x_proj stays 16-bit


@pytest.mark.parametrize("model", ["h1", "mamba"])
def test_fp8_matches_transformers_on_dequantized_weights(tmp_path, h1_source, mamba_source, model):
    source = h1_source if model == "h1" else mamba_source
    write_fp8_reference(source, tmp_path / "plain")
    llm = compare(source, tmp_path / "plain", quantization="fp8")
    layers = layers_of(llm, FP8Linear)
    assert layers and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)


FP8_CHECKPOINTS = {  # model, per_channel, static, compressed_tensors, weight_only
    "vllm_h1_tensor_dynamic": ("h1", False, False, False, False),
    "vllm_h1_channel_static": ("h1", True, True, False, False),
    "vllm_mamba_tensor_static": ("mamba", False, True, False, False),
    "ct_h1_channel_token": ("h1", True, False, True, False),  # llm-compressor's FP8_DYNAMIC
    "ct_mamba_tensor_static": ("mamba", False, True, True, False),  # its FP8 (x_proj, dt_proj in `ignore`)
    "ct_h1_channel_weight_only": ("h1", True, False, True, True),
}


@pytest.mark.parametrize("variant", FP8_CHECKPOINTS)
def test_fp8_checkpoints_match_transformers_on_dequantized_weights(tmp_path, h1_source, mamba_source, variant):
    model, per_channel, static, compressed_tensors, weight_only = FP8_CHECKPOINTS[variant]
    write_fp8_checkpoint(h1_source if model == "h1" else mamba_source, tmp_path / "fp8", tmp_path / "plain",
                         per_channel=per_channel, static=static, compressed_tensors=compressed_tensors,
                         weight_only=weight_only)
    flag = "compressed-tensors" if compressed_tensors else None  # vLLM's flag for them: it checks the config
    llm = compare(tmp_path / "fp8", tmp_path / "plain", quantization=flag)
    layers = layers_of(llm, FP8Linear)
    assert layers and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)


CT_INT_VARIANTS = {  # model, bits, group_size, sym, actorder: llm-compressor's W4A16 / W8A16 (GPTQ or not)
    "h1_w4a16_g128": ("h1", 4, 128, True, False),
    "h1_w4a16_g32_asym_actorder": ("h1", 4, 32, False, True),
    "h1_w8a16_channel": ("h1", 8, -1, True, False),
    "h1_w8a16_g64_asym_actorder": ("h1", 8, 64, False, True),
    "mamba_w4a16_g64_actorder": ("mamba", 4, 64, True, True),
}


@pytest.mark.parametrize("variant", CT_INT_VARIANTS)
def test_compressed_tensors_int_checkpoints_match_transformers_on_dequantized_weights(tmp_path, h1_source,
                                                                                      mamba_source, variant):
    model, bits, group_size, sym, actorder = CT_INT_VARIANTS[variant]
    write_compressed_tensors_int(h1_source if model == "h1" else mamba_source, tmp_path / "ct", tmp_path / "plain",
                                 bits=bits, group_size=group_size, sym=sym, actorder=actorder)
    llm = compare(tmp_path / "ct", tmp_path / "plain", quantization="compressed-tensors")
    layers = layers_of(llm, GPTQLinear)
    assert layers and all(layer.bits == bits for layer in layers)


@pytest.mark.parametrize("model, group_size", [("h1", 128), ("h1", 32), ("mamba", 64)])
def test_awq_checkpoints_match_transformers_on_dequantized_weights(tmp_path, h1_source, mamba_source, model,
                                                                   group_size):
    write_awq(h1_source if model == "h1" else mamba_source, tmp_path / "awq", tmp_path / "plain",
              group_size=group_size)
    llm = compare(tmp_path / "awq", tmp_path / "plain", quantization="awq" if group_size == 32 else None)
    assert layers_of(llm, GPTQLinear)
    with pytest.raises(ConfigError, match="no gptq quantization_config"):
        LLM(str(tmp_path / "awq"), device="cpu", dtype="float32", quantization="gptq")


@pytest.mark.parametrize("changes, field", [
    (dict(bits=8), "bits"), (dict(group_size=100), "group_size"), (dict(version="gemv"), "version"),
    (dict(version="marlin"), "version"), (dict(zero_point=False), "zero_point"),
    (dict(modules_to_not_convert=["self_attn.o_proj"]), "modules_to_not_convert"),
])
def test_unsupported_awq_fields_are_named(changes, field):
    awq = dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemm", modules_to_not_convert=None)
    assert parse_with(awq) == GPTQConfig(bits=4, group_size=128, desc_act=False, sym=False, zeros_offset_by_one=False,
                                         checkpoint="awq")
    with pytest.raises(ConfigError, match=field):
        parse_with({**awq, **changes})


def test_memory_plan_counts_packed_weights(tmp_path, h1_source):
    write_gptq(h1_source, tmp_path / "gptq", tmp_path / "plain", bits=4, group_size=128, desc_act=False)
    quant = LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32").engine.runner.model
    plain = LLM(str(tmp_path / "plain"), device="cpu", dtype="float32").engine.runner.model
    fused = quant.model.layers[0].in_proj
    K, N = fused.in_features, fused.out_features
    padded = -(-N // 64) * 64  # stored columns are padded to a multiple of 64
    assert fused.qweight.nbytes == K * padded // 2  # 4 bits a weight
    # fp32 weights -> 4-bit codes plus one fp32 scale and int16 zero per 128 weights, over the padded columns
    quantized_bytes = sum(m.in_features * -(-m.out_features // 64) * 64 * (4 + 48 / 128) / 8
                          for m in quant.modules() if isinstance(m, GPTQLinear))
    projections = sum(m.weight.nbytes for m in plain.modules() if isinstance(m, torch.nn.Linear))  # not LMHead
    assert model_weight_bytes(plain) - model_weight_bytes(quant) == pytest.approx(projections - quantized_bytes,
                                                                                  rel=1e-3)


def quant_config(**changes) -> dict:
    cfg = dict(quant_method="gptq", bits=4, group_size=128, desc_act=True, sym=True, checkpoint_format="gptq")
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


def parse_with(qcfg: dict):
    raw = falcon_h1_config(**H1_QUANT).to_dict()
    raw["architectures"] = ["FalconH1ForCausalLM"]
    raw["quantization_config"] = qcfg
    return parse_model_config(raw)[1].quantization


def test_gptq_config_fields_are_read():
    q = parse_with(quant_config(bits=8, group_size=-1, desc_act=False, sym=False, checkpoint_format="gptq_v2"))
    assert q == GPTQConfig(bits=8, group_size=-1, desc_act=False, sym=False, zeros_offset_by_one=False)
    assert parse_with(quant_config()).zeros_offset_by_one


@pytest.mark.parametrize("changes, field", [
    (dict(bits=3), "bits"), (dict(bits=None), "bits"), (dict(group_size=100), "group_size"),
    (dict(checkpoint_format="marlin"), "checkpoint_format"),
    (dict(quant_method="compressed-tensors"), "format"),  # what a GPTQ config lacks of compressed-tensors' FP8
    (dict(lm_head=True), "lm_head"), (dict(pack_dtype="int16"), "pack_dtype"),
    (dict(dynamic={"-:.*down_proj": {}}), "dynamic"), (dict(desc_act="yes"), "desc_act"),
    (dict(modules_in_block_to_quantize=[["self_attn.q_proj"]]), "modules_in_block_to_quantize"),
])
def test_unsupported_gptq_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=field):
        parse_with(quant_config(**changes))


def test_quantization_flag_is_checked_against_the_checkpoint(tmp_path, h1_source):
    with pytest.raises(ConfigError, match="no gptq quantization_config"):
        LLM(str(h1_source), device="cpu", dtype="float32", quantization="gptq")
    write_gptq(h1_source, tmp_path / "gptq", tmp_path / "plain", bits=4, group_size=128, desc_act=False)
    with pytest.raises(ConfigError, match="already gptq-quantized"):
        LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32", quantization="fp8")
    with pytest.raises(ValueError, match="quantization must be"):
        EngineArgs(model=str(h1_source), quantization="bitsandbytes")
    with pytest.raises(ConfigError, match="no awq quantization_config"):
        LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32", quantization="awq")
    with pytest.raises(ConfigError, match="no compressed-tensors quantization_config"):
        LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32", quantization="compressed-tensors")


def test_broken_gptq_checkpoints_are_clear_errors(tmp_path, h1_source):
    from safetensors.torch import load_file, save_file

    write_gptq(h1_source, tmp_path / "gptq", tmp_path / "plain", bits=4, group_size=32, desc_act=True)
    path = tmp_path / "gptq" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.feed_forward.down_proj.g_idx"
    tensors[name] = torch.zeros_like(tensors[name])  # every channel in group 0
    save_file(tensors, str(path))
    with pytest.raises(LoadError, match="down_proj.g_idx"):
        LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = quant_config()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))  # says GPTQ, holds 16-bit weights
    with pytest.raises(LoadError, match="quantization_config"):
        LLM(str(tmp_path / "plain"), device="cpu", dtype="float32")


def test_g_idx_may_be_left_out_without_act_order(tmp_path, h1_source):
    from safetensors.torch import load_file, save_file

    write_gptq(h1_source, tmp_path / "gptq", tmp_path / "plain", bits=4, group_size=32, desc_act=False)
    path = tmp_path / "gptq" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if not k.endswith(".g_idx")}, str(path))
    compare(tmp_path / "gptq", tmp_path / "plain")


def test_engine_packing_agrees_with_the_test_packer():
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        q = torch.randint(0, 1 << bits, (64, 24), generator=g)
        packed = torch.from_numpy(pack_along_rows(q.numpy(), bits))
        assert torch.equal(unpack_int32(packed, bits, dim=0), q.int())
        assert torch.equal(pack_int32_rows(q, bits), packed)
        assert torch.equal(unpack_int32(torch.from_numpy(pack_along_cols(q.numpy(), bits)), bits, dim=1), q.int())


@pytest.mark.parametrize("changes, field", [
    (dict(weight_block_size=[128, 128]), "weight_block_size"),
    (dict(activation_scheme="per-token"), "activation_scheme"),
    (dict(ignored_layers=["model.layers.0.self_attn.q_proj"]), "ignored_layers"), (dict(fmt="e5m2"), "fmt"),
])
def test_unsupported_fp8_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=field):
        parse_with({"quant_method": "fp8", "activation_scheme": "dynamic", **changes})
    assert parse_with(dict(quant_method="fp8", ignored_layers=["lm_head"])) == FP8Config(checkpoint="fp8")


def ct_config(**changes) -> dict:
    """compressed-tensors' FP8_DYNAMIC config as llm-compressor writes it; changes: top-level fields, or
    "weights" / "input_activations" / "group": fields of the one config group's scheme."""
    fp8 = dict(num_bits=8, type="float", symmetric=True, group_size=None, actorder=None, observer=None)
    group = dict(targets=["Linear"], weights=dict(fp8, strategy="channel", dynamic=False),
                 input_activations=dict(fp8, strategy="token", dynamic=True), output_activations=None)
    group["weights"].update(changes.pop("weights", {}))
    group["input_activations"].update(changes.pop("input_activations", {}))
    group.update(changes.pop("group", {}))
    config = dict(quant_method="compressed-tensors", format="float-quantized", quantization_status="compressed",
                  config_groups={"group_0": group}, ignore=["lm_head"], kv_cache_scheme=None)
    return {**config, **changes}


def test_compressed_tensors_fp8_configs_are_read():
    dynamic = FP8Config(checkpoint="compressed-tensors")
    static = FP8Config(checkpoint="compressed-tensors", static_input_scale=True)
    assert parse_with(ct_config()) == dynamic
    assert parse_with(ct_config(input_activations=dict(strategy="tensor", dynamic=False))) == static
    assert parse_with(ct_config(group=dict(input_activations=None))) == dynamic
    preset = dict(quant_method="compressed-tensors", format="float-quantized", config_groups={"FP8": ["Linear"]})
    assert parse_with(preset) == static
    assert parse_with(ct_config(ignore=["lm_head", "re:.*mixer.x_proj$"])) == dynamic


@pytest.mark.parametrize("changes, field", [
    (dict(format="int-quantized"), "format"), (dict(format="naive-quantized"), "format"),
    (dict(format="pack-quantized"), r"weights\.type"),  # FP8 weights in the integer format
    (dict(quantization_status="frozen"), "quantization_status"),
    (dict(kv_cache_scheme=dict(num_bits=8, type="float")), "kv_cache_scheme"),
    (dict(ignore=["lm_head", "model.layers.3.feed_forward.down_proj"]), "ignore"),
    (dict(ignore=["re:.*self_attn.*"]), "ignore"),
    (dict(group=dict(targets=["re:.*down_proj"])), "targets"), (dict(group=dict(format="int-quantized")), "format"),
    (dict(group=dict(output_activations=dict(num_bits=8))), "output_activations"),
    (dict(weights=dict(type="int")), r"weights\.type"), (dict(weights=dict(num_bits=4)), r"weights\.num_bits"),
    (dict(weights=dict(strategy="block", block_structure=[128, 128])), r"weights\.strategy"),
    (dict(weights=dict(strategy="group", group_size=128)), r"weights\.strategy"),
    (dict(weights=dict(symmetric=False)), r"weights\.symmetric"), (dict(weights=dict(dynamic=True)), "dynamic"),
    (dict(input_activations=dict(strategy="group", group_size=128)), r"input_activations\.strategy"),
    (dict(input_activations=dict(dynamic=False)), "input_activations"),  # static scales per token
])
def test_unsupported_compressed_tensors_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=field):
        parse_with(ct_config(**changes))


def ct_int_config(**weights) -> dict:
    """compressed-tensors' W4A16 config (pack-quantized) as llm-compressor writes it, its weights' fields changed."""
    args = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, dynamic=False, actorder=None)
    group = dict(targets=["Linear"], weights={**args, **weights}, input_activations=None, output_activations=None)
    return dict(quant_method="compressed-tensors", format="pack-quantized", quantization_status="compressed",
                config_groups={"group_0": group}, ignore=["lm_head"])


def test_compressed_tensors_int_configs_are_read():
    ct = dict(zeros_offset_by_one=False, checkpoint="compressed-tensors")
    assert parse_with(ct_int_config()) == GPTQConfig(bits=4, group_size=128, desc_act=False, sym=True, **ct)
    assert parse_with(ct_int_config(num_bits=8, strategy="channel", group_size=None, symmetric=False)) == GPTQConfig(
        bits=8, group_size=-1, desc_act=False, sym=False, **ct)
    assert parse_with(ct_int_config(actorder="group")).desc_act and not parse_with(ct_int_config(actorder="weight")
                                                                                   ).desc_act
    preset = dict(quant_method="compressed-tensors", format="pack-quantized", config_groups={"W8A16": ["Linear"]})
    assert parse_with(preset) == GPTQConfig(bits=8, group_size=128, desc_act=False, sym=True, **ct)


@pytest.mark.parametrize("weights, field", [
    (dict(num_bits=3), "num_bits"), (dict(num_bits=None), "num_bits"), (dict(type="float"), "type"),
    (dict(strategy="tensor", group_size=None), "strategy"), (dict(group_size=100), "group_size"),
    (dict(actorder="sideways"), "actorder"), (dict(dynamic=True), "dynamic"),
])
def test_unsupported_compressed_tensors_int_fields_are_named(weights, field):
    with pytest.raises(ConfigError, match=rf"weights\.{field}"):
        parse_with(ct_int_config(**weights))
    w8a8 = ct_int_config()
    w8a8["config_groups"]["group_0"]["input_activations"] = dict(num_bits=8, type="int", strategy="token")
    with pytest.raises(ConfigError, match="input_activations"):
        parse_with(w8a8)


def test_compressed_tensors_config_groups_are_checked():
    two = ct_config()
    two["config_groups"]["group_1"] = two["config_groups"]["group_0"]
    with pytest.raises(ConfigError, match="config_groups"):
        parse_with(two)
    with pytest.raises(ConfigError, match="preset 'NVFP4'"):
        parse_with(dict(quant_method="compressed-tensors", format="float-quantized",
                        config_groups={"NVFP4": ["Linear"]}))


def test_fp8_config_parses_from_the_flag():
    from engine.quantization import resolve_quantization

    assert resolve_quantization(None, "fp8") == FP8Config()
    assert resolve_quantization(None, None) is None


GPU_SHARE = dict(gpu_memory_utilization=GPU_TEST_MEMORY, max_num_seqs=8)
# RESULTS.md: bf16 against fp32 on the random Falcon-H1-0.5B-shaped model, first token's top-20 logprobs
BF16_SPREAD_MAX, BF16_SPREAD_MEAN = 0.52, 0.138
SPREAD_FACTOR = 2.0


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_on_gpu_matches_transformers_in_float32(tmp_path, h1_source, bits):
    """The Triton kernels (IEEE fp32 dots) inside the engine, with CUDA graphs, against the same reference."""
    write_gptq(h1_source, tmp_path / "gptq", tmp_path / "plain", bits=bits, group_size=32, desc_act=True)
    llm = LLM(str(tmp_path / "gptq"), device="cuda", dtype="float32", **GPU_SHARE)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        assert out.outputs[0].token_ids == reference_greedy(tmp_path / "plain", prompt, MAX_TOKENS)


@pytest.mark.gpu
def test_fp8_on_gpu_matches_transformers_in_float32(tmp_path, h1_source):
    write_fp8_reference(h1_source, tmp_path / "plain")
    llm = LLM(str(h1_source), device="cuda", dtype="float32", quantization="fp8", **GPU_SHARE)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        assert out.outputs[0].token_ids == reference_greedy(tmp_path / "plain", prompt, MAX_TOKENS)


def first_token_top20(directory, dtype: str, **engine_args) -> list[dict]:
    prompts = [[5 + (11 * i + 5 * j) % 250 for j in range(3 + 9 * i)] for i in range(6)]
    # One prefill, no decode step: eager (capturing CUDA graphs would only add minutes of kernel compiles).
    llm = LLM(str(directory), device="cuda", dtype=dtype, load_format="dummy", max_model_len=2048, enforce_eager=True,
              **GPU_SHARE, **engine_args)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=20))
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].logprobs[0] for o in outs]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gptq-int4", "gptq-int8", "fp8"])
def test_quantized_bf16_agrees_with_float32_on_0_5b_shapes(tmp_path, variant):
    """Same quantized random weights (Falcon-H1-0.5B shapes, group 128, act-order), bf16 against fp32: the
    kernels must add no more than SPREAD_FACTOR x what bf16 costs the unquantized model (RESULTS.md)."""
    from benchmarks.offline import SHAPES
    from engine.tokenizer import byte_level_tokenizer_files

    config = dict(SHAPES["falcon-h1-0.5b"])
    if variant != "fp8":
        config["quantization_config"] = dict(quant_method="gptq", bits=int(variant[-1]), group_size=128,
                                             desc_act=True, sym=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    byte_level_tokenizer_files(tmp_path)
    extra = dict(quantization="fp8") if variant == "fp8" else {}
    fp32, bf16 = (first_token_top20(tmp_path, dtype, **extra) for dtype in ("float32", "bfloat16"))
    diffs = [abs(a[t] - b[t]) for a, b in zip(fp32, bf16) for t in a.keys() & b.keys()]
    assert diffs, f"{variant}: the bf16 and fp32 top-20 tokens have nothing in common"
    worst, mean = max(diffs), sum(diffs) / len(diffs)
    print(f"{variant} bf16 vs fp32: max |logprob diff| {worst:.4f}, mean {mean:.4f} over the top-20 tokens")
    assert worst < SPREAD_FACTOR * BF16_SPREAD_MAX and mean < SPREAD_FACTOR * BF16_SPREAD_MEAN
