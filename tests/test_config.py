"""config.json parsing: both transformers file styles, every field we honour, clear errors."""

import json
import math

import pytest

from engine.config import (
    ConfigError,
    EngineArgs,
    FalconH1Config,
    FalconMambaConfig,
    load_model_config,
    parse_model_config,
)

OLD_STYLE_H1 = {
    "architectures": ["FalconH1ForCausalLM"], "vocab_size": 32784, "hidden_size": 1024, "intermediate_size": 2048,
    "num_hidden_layers": 36, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128,
    "mamba_chunk_size": 128, "mamba_rms_norm": False, "mamba_norm_before_gate": False, "rope_theta": 1e11,
    "time_step_limit": [0.0, math.inf], "torch_dtype": "bfloat16", "max_position_embeddings": 16384,
    "embedding_multiplier": 5.656854, "lm_head_multiplier": 0.0390625, "key_multiplier": 0.390625,
    "attention_out_multiplier": 0.9375, "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.235702,
    "mlp_multipliers": [0.883883, 0.5859375], "ssm_multipliers": [0.353553, 0.25, 0.353553, 0.5, 0.353553],
    "eos_token_id": 11, "bos_token_id": 1,
}


def test_old_style_falcon_h1_0_5b(tmp_path):
    # json.dumps writes inf as the bare token Infinity, as older transformers did.
    (tmp_path / "config.json").write_text(json.dumps(OLD_STYLE_H1))
    arch, cfg = load_model_config(tmp_path)
    assert arch == "FalconH1ForCausalLM" and isinstance(cfg, FalconH1Config)
    assert cfg.rope_theta == 1e11 and cfg.time_step_limit == (0.0, math.inf)
    assert cfg.head_dim == 64 and cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size
    assert cfg.conv_dim == 1536 + 2 * 128 and cfg.ssm_state_shape == (24, 64, 128)
    assert cfg.dtype.__repr__() == "torch.bfloat16" and cfg.eos_token_ids == (11,)
    assert cfg.ssm_multipliers[3] == 0.5 and cfg.mlp_multipliers == (0.883883, 0.5859375)


def test_transformers5_style(tmp_path):
    raw = dict(OLD_STYLE_H1)
    del raw["rope_theta"], raw["torch_dtype"]
    raw.update(rope_parameters={"rope_theta": 1e11, "rope_type": "default"}, dtype="float32",
               time_step_limit=[0.0, {"__float__": "Infinity"}], eos_token_id=[11, 12])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _, cfg = load_model_config(tmp_path)
    assert cfg.rope_theta == 1e11 and cfg.time_step_limit[1] == math.inf and cfg.eos_token_ids == (11, 12)


def test_written_by_installed_transformers(h1_dir, mamba_dir):
    _, h1 = load_model_config(h1_dir)
    assert h1.mamba_n_groups == 2 and h1.head_dim == 24 and h1.embedding_multiplier == 2.5
    _, fm = load_model_config(mamba_dir)
    assert isinstance(fm, FalconMambaConfig) and fm.intermediate_size == 80 and fm.time_step_rank == 6


def test_falcon_mamba_defaults():
    _, cfg = parse_model_config({"architectures": ["FalconMambaForCausalLM"], "vocab_size": 65024,
                                 "hidden_size": 4096, "num_hidden_layers": 64, "intermediate_size": 8192,
                                 "expand": 16, "time_step_rank": "auto"})
    assert cfg.intermediate_size == 8192 and cfg.time_step_rank == 256 and cfg.bcdt_norm
    assert cfg.residual_in_fp32 and cfg.mixer_rms_eps == 1e-6 and cfg.ssm_state_shape == (8192, 16)


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
    ({"architectures": []}, "architectures"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"mamba_n_heads": 7}, "mamba_n_heads"),
    ({"ssm_multipliers": [1, 2]}, "ssm_multipliers"),
    ({"mamba_rms_norm": "yes"}, "mamba_rms_norm"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, "rope_type"),
    ({"torch_dtype": "int8"}, "dtype"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_malformed_config_names_the_field(change, field):
    raw = dict(OLD_STYLE_H1)
    raw.update(change)
    with pytest.raises(ConfigError, match=field):
        parse_model_config(raw)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path)


def test_engine_args_validation():
    with pytest.raises(ValueError, match="dtype"):
        EngineArgs(model="x", dtype="int4")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs(model="x", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="LoRA adapters .* tensor_parallel_size > 1"):
        EngineArgs(model="x", enable_lora=True, tensor_parallel_size=2)
    assert EngineArgs(model="x", enable_lora=True).tensor_parallel_size == 1
