"""Model configs parsed from HF config.json files, and the engine's own arguments.

Both file styles are accepted: older transformers (top-level `rope_theta`, `torch_dtype`,
`time_step_limit: [0.0, Infinity]`) and transformers 5 (`rope_parameters`, `dtype`,
`{"__float__": "Infinity"}`). Every field we need is checked; a bad one is a ConfigError naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used, so that `falcon-serve --help` needs no torch
    import torch

if TYPE_CHECKING:
    from engine.lora import LoRAModulePath
    from engine.quantization import QuantConfig

QUANTIZATION_METHODS = ("gptq", "awq", "compressed-tensors", "fp8")  # --quantization; engine/quantization resolves it


class ConfigError(ValueError):
    pass


_MISSING = object()


def _decode_special_floats(obj: dict) -> Any:
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"}.
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


class _Fields:
    """Typed access to a config dict; errors name the offending field."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def get(self, name: str, kind: type | tuple, default: Any = _MISSING) -> Any:
        if name not in self.raw or self.raw[name] is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing required field '{name}'")
            return default
        value = self.raw[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{self.source}: field '{name}' must be {_kind_name(kind)}, got {value!r}")
        return value

    def positive(self, name: str, default: Any = _MISSING) -> int:
        value = self.get(name, int, default)
        if value <= 0:
            raise ConfigError(f"{self.source}: field '{name}' must be a positive integer, got {value!r}")
        return value

    def floats(self, name: str, length: int, default: Any = _MISSING) -> tuple[float, ...]:
        value = self.get(name, (list, tuple), default)
        if len(value) != length or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{self.source}: field '{name}' must be a list of {length} numbers, got {value!r}")
        return tuple(float(v) for v in value)


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", bool: "a boolean", str: "a string",
                        list: "a list", tuple: "a list", dict: "an object"}[k] for k in kinds)


def _checkpoint_dtype(f: _Fields) -> torch.dtype:
    import torch

    name = f.raw.get("dtype") or f.raw.get("torch_dtype") or "float32"
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"{f.source}: field 'torch_dtype'/'dtype' must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def _token_ids(f: _Fields, name: str) -> list[int]:
    value = f.raw.get(name)
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{f.source}: field '{name}' must be a token id or a list of them, got {value!r}")
    return ids


def _quantization(raw: dict, source: str) -> QuantConfig | None:
    from engine.quantization import parse_quantization_config  # it raises our ConfigError

    return parse_quantization_config(raw.get("quantization_config"), source)


def _check_silu(f: _Fields) -> None:
    act = f.get("hidden_act", str, "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{f.source}: field 'hidden_act' must be 'silu', got {act!r}")


@dataclass(frozen=True)
class FalconH1Config:
    """Falcon-H1: every layer runs a Mamba2 mixer and GQA attention in parallel, then a SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    # Mamba2 mixer
    mamba_d_ssm: int
    mamba_n_heads: int
    mamba_d_head: int
    mamba_n_groups: int
    mamba_d_state: int
    mamba_d_conv: int
    mamba_chunk_size: int
    mamba_conv_bias: bool
    mamba_proj_bias: bool
    mamba_rms_norm: bool
    mamba_norm_before_gate: bool
    projectors_bias: bool
    time_step_limit: tuple[float, float]
    # muP multipliers (folded into the weights at load time)
    embedding_multiplier: float
    lm_head_multiplier: float
    key_multiplier: float
    attention_in_multiplier: float
    attention_out_multiplier: float
    ssm_in_multiplier: float
    ssm_out_multiplier: float
    ssm_multipliers: tuple[float, ...]
    mlp_multipliers: tuple[float, ...]
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quantization: QuantConfig | None = None  # config.json's quantization_config, or --quantization

    @property
    def conv_dim(self) -> int:
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def num_mamba_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_attention_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        return (self.conv_dim, self.mamba_d_conv - 1)

    @property
    def ssm_state_shape(self) -> tuple[int, ...]:
        return (self.mamba_n_heads, self.mamba_d_head, self.mamba_d_state)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> FalconH1Config:
        f = _Fields(raw, source)
        _check_silu(f)
        hidden = f.positive("hidden_size")
        heads = f.positive("num_attention_heads")
        kv_heads = f.positive("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: 'num_attention_heads' ({heads}) must be a multiple of "
                              f"'num_key_value_heads' ({kv_heads})")
        d_ssm = f.get("mamba_d_ssm", int, None) or int(f.get("mamba_expand", (int, float), 2) * hidden)
        n_heads = f.positive("mamba_n_heads")
        d_head = raw.get("mamba_d_head", "auto")
        d_head = d_ssm // n_heads if d_head == "auto" else f.positive("mamba_d_head")
        if n_heads * d_head != d_ssm:
            raise ConfigError(f"{source}: 'mamba_n_heads' * 'mamba_d_head' ({n_heads}*{d_head}) must equal "
                              f"the Mamba inner size {d_ssm} ('mamba_d_ssm')")
        groups = f.positive("mamba_n_groups", 1)
        if n_heads % groups:
            raise ConfigError(f"{source}: 'mamba_n_heads' ({n_heads}) must be a multiple of "
                              f"'mamba_n_groups' ({groups})")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' {rope_type!r} is not supported "
                              "(only 'default')")
        rope_theta = rope.get("rope_theta", f.get("rope_theta", float, 10000.0))
        limit = f.floats("time_step_limit", 2, (0.0, math.inf))
        return cls(
            vocab_size=f.positive("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.positive("intermediate_size"),
            num_hidden_layers=f.positive("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=f.get("head_dim", int, None) or hidden // heads,
            max_position_embeddings=f.positive("max_position_embeddings", 8192),
            rms_norm_eps=f.get("rms_norm_eps", float, 1e-5),
            rope_theta=float(rope_theta),
            tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
            attention_bias=f.get("attention_bias", bool, False),
            mlp_bias=f.get("mlp_bias", bool, False),
            mamba_d_ssm=d_ssm,
            mamba_n_heads=n_heads,
            mamba_d_head=d_head,
            mamba_n_groups=groups,
            mamba_d_state=f.positive("mamba_d_state", 256),
            mamba_d_conv=f.positive("mamba_d_conv", 4),
            mamba_chunk_size=f.positive("mamba_chunk_size", 256),
            mamba_conv_bias=f.get("mamba_conv_bias", bool, True),
            mamba_proj_bias=f.get("mamba_proj_bias", bool, False),
            mamba_rms_norm=f.get("mamba_rms_norm", bool, False),
            mamba_norm_before_gate=f.get("mamba_norm_before_gate", bool, True),
            projectors_bias=f.get("projectors_bias", bool, False),
            time_step_limit=(limit[0], limit[1]),
            embedding_multiplier=f.get("embedding_multiplier", float, 1.0),
            lm_head_multiplier=f.get("lm_head_multiplier", float, 1.0),
            key_multiplier=f.get("key_multiplier", float, 1.0),
            attention_in_multiplier=f.get("attention_in_multiplier", float, 1.0),
            attention_out_multiplier=f.get("attention_out_multiplier", float, 1.0),
            ssm_in_multiplier=f.get("ssm_in_multiplier", float, 1.0),
            ssm_out_multiplier=f.get("ssm_out_multiplier", float, 1.0),
            ssm_multipliers=f.floats("ssm_multipliers", 5, (1.0,) * 5),
            mlp_multipliers=f.floats("mlp_multipliers", 2, (1.0, 1.0)),
            dtype=_checkpoint_dtype(f),
            bos_token_id=f.get("bos_token_id", int, None),
            eos_token_ids=tuple(_token_ids(f, "eos_token_id")),
            quantization=_quantization(raw, source),
        )


@dataclass(frozen=True)
class FalconMambaConfig:
    """FalconMamba (Mamba1 with weightless RMS norms on B, C and dt); plain Mamba when `bcdt_norm` is off."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    state_size: int
    conv_kernel: int
    time_step_rank: int
    layer_norm_epsilon: float
    mixer_rms_eps: float
    bcdt_norm: bool
    residual_in_fp32: bool
    tie_word_embeddings: bool
    use_bias: bool
    use_conv_bias: bool
    max_position_embeddings: int
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quantization: QuantConfig | None = None  # config.json's quantization_config, or --quantization

    num_attention_layers = 0

    @property
    def num_mamba_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        return (self.intermediate_size, self.conv_kernel - 1)

    @property
    def ssm_state_shape(self) -> tuple[int, ...]:
        return (self.intermediate_size, self.state_size)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json", bcdt_norm: bool = True) -> FalconMambaConfig:
        f = _Fields(raw, source)
        _check_silu(f)
        hidden = f.positive("hidden_size")
        rank = raw.get("time_step_rank", "auto")
        rank = math.ceil(hidden / 16) if rank == "auto" else f.positive("time_step_rank")
        intermediate = f.get("intermediate_size", int, None) or int(f.get("expand", (int, float), 2) * hidden)
        return cls(
            vocab_size=f.positive("vocab_size"),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=f.positive("num_hidden_layers"),
            state_size=f.positive("state_size", 16),
            conv_kernel=f.positive("conv_kernel", 4),
            time_step_rank=rank,
            layer_norm_epsilon=f.get("layer_norm_epsilon", float, 1e-5),
            mixer_rms_eps=f.get("mixer_rms_eps", float, 1e-6),
            bcdt_norm=bcdt_norm,
            residual_in_fp32=f.get("residual_in_fp32", bool, True),
            tie_word_embeddings=f.get("tie_word_embeddings", bool, True),
            use_bias=f.get("use_bias", bool, False),
            use_conv_bias=f.get("use_conv_bias", bool, True),
            # Pure SSMs have no position limit; this only bounds the default max_model_len.
            max_position_embeddings=f.get("max_position_embeddings", int, 1 << 20),
            dtype=_checkpoint_dtype(f),
            bos_token_id=f.get("bos_token_id", int, None),
            eos_token_ids=tuple(_token_ids(f, "eos_token_id")),
            quantization=_quantization(raw, source),
        )


ModelConfig = FalconH1Config | FalconMambaConfig

SUPPORTED_ARCHITECTURES = ("FalconH1ForCausalLM", "FalconMambaForCausalLM", "MambaForCausalLM")


def parse_model_config(raw: dict, source: str = "config.json") -> tuple[str, ModelConfig]:
    """Returns (architecture, config) for a config.json dict."""
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError(f"{source}: field 'architectures' must be a non-empty list of names, got {archs!r}")
    arch = archs[0]
    if arch == "FalconH1ForCausalLM":
        return arch, FalconH1Config.from_dict(raw, source)
    if arch in ("FalconMambaForCausalLM", "MambaForCausalLM"):
        return arch, FalconMambaConfig.from_dict(raw, source, bcdt_norm=arch == "FalconMambaForCausalLM")
    raise ConfigError(f"{source}: architecture {arch!r} is not supported; "
                      f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def read_json_object(path: Path, error: type[Exception], missing: str) -> dict:
    """The JSON object in the file `path`; raises error(missing) when there is no such file, and an error
    naming the file when it is not a JSON object."""
    try:
        raw = json.loads(path.read_text(), object_hook=_decode_special_floats)
    except FileNotFoundError:
        raise error(missing) from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: must hold a JSON object")
    return raw


def load_model_config(model_dir: str | Path) -> tuple[str, ModelConfig]:
    path = Path(model_dir) / "config.json"
    raw = read_json_object(path, ConfigError, f"no config.json in {model_dir}")
    return parse_model_config(raw, str(path))


@dataclass
class EngineArgs:
    """What a user chooses when starting the engine (flags of the same names on the CLI)."""

    model: str
    tokenizer: str | None = None  # directory with tokenizer.json; default: the model's
    revision: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto (checkpoint dtype) | float32 | bfloat16 | float16
    max_model_len: int | None = None  # default: min(max_position_embeddings, 32768)
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # token budget per step; default 2048 (CPU), 8192 (CUDA)
    kv_block_size: int = 16
    num_kv_blocks: int | None = None  # default: planned from free memory
    gpu_memory_utilization: float = 0.9
    ssm_state_dtype: str = "float32"
    seed: int = 0
    enforce_eager: bool = False
    chat_template: str | None = None  # template text overriding the tokenizer's
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights of the right shapes, for benchmarks)
    quantization: str | None = None  # None: as the checkpoint is | gptq, awq, compressed-tensors (checks) | fp8
    enable_prefix_caching: bool = True  # reuse cached KV blocks and SSM-state checkpoints of earlier prompts
    prefix_cache_checkpoints: int | None = None  # state checkpoint rows; default: planned (a memory share)
    enable_lora: bool = False  # serve LoRA adapters (engine.lora); sizes the device stacks below
    max_loras: int = 1  # adapters resident on the device at once (rows of the stacks)
    max_lora_rank: int = 16  # the stacks' rank: a larger adapter is refused
    max_cpu_loras: int | None = None  # adapters kept in host memory; default: max_loras
    lora_modules: list[LoRAModulePath] | None = None  # adapters served from start-up
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) the model is split over
    # Launch a decode step before the previous one's tokens reach the host (LLMEngine.step); one rank only.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.device in ("auto", "cuda", "cpu") or self.device.startswith("cuda:"),
              f"device must be auto, cuda or cpu, got {self.device!r}")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check(self.quantization in (None, *QUANTIZATION_METHODS),
              f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        check(self.load_format in ("auto", "dummy"), f"load_format must be auto or dummy, got {self.load_format!r}")
        check(self.ssm_state_dtype in ("float32", "bfloat16", "float16"),
              f"ssm_state_dtype must be float32, bfloat16 or float16, got {self.ssm_state_dtype!r}")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1")
        check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens must be >= 1")
        check(self.kv_block_size >= 1, "kv_block_size must be >= 1")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]")
        check(self.prefix_cache_checkpoints is None or self.prefix_cache_checkpoints >= 0,
              "prefix_cache_checkpoints must be >= 0")
        check(self.max_loras >= 1, "max_loras must be >= 1")
        check(self.max_lora_rank >= 1, "max_lora_rank must be >= 1")
        check(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras,
              "max_cpu_loras must be >= max_loras")
        check(self.enable_lora or not self.lora_modules, "lora_modules need enable_lora")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1")
        check(not (self.enable_lora and self.tensor_parallel_size > 1),
              "LoRA adapters (enable_lora) with tensor_parallel_size > 1 are not supported yet")
