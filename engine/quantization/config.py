"""Quantization configs: GPTQ or FP8 from a checkpoint's `quantization_config` (GPTQ's own, AWQ's GEMM layout,
vLLM's `fp8`; compressed-tensors' float-quantized FP8 and pack-quantized integer weights, read as FP8 and GPTQ
layers), FP8 from `--quantization fp8`.

Every field of a GPTQ `quantization_config` that changes what the stored tensors mean is read and
checked; an unsupported value is a ConfigError naming the field. Fields that only describe how the
checkpoint was made (calibration data, damping, ...) do not change inference and are accepted as is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from engine.config import QUANTIZATION_METHODS, ConfigError

logger = logging.getLogger(__name__)

# Written by AutoGPTQ / GPTQModel / transformers' GPTQConfig; they only describe the quantization run.
_GPTQ_PROCESS_FIELDS = {
    "damp_percent", "damp_auto_increment", "true_sequential", "static_groups", "mse", "tokenizer", "dataset",
    "model_name_or_path", "model_file_base_name", "meta", "quantizer", "use_cuda_fp16", "model_seqlen",
    "block_name_to_quantize", "module_name_preceding_first_block", "batch_size", "pad_token_id", "use_exllama",
    "exllama_config", "max_input_length", "cache_block_outputs", "backend", "is_marlin_format", "v2",
    "v2_alpha", "v2_memory_device", "hyb_act", "act_group_aware", "adapter", "rotation", "buffered_fwd", "fail_safe",
    "mock_quantization",
}


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ integer weights: `bits` per value packed into int32 along the input dimension, one fp16 scale
    and zero point per (group of `group_size` input channels, output channel); g_idx maps channels to groups."""

    bits: int
    group_size: int  # -1: one group spanning all input channels
    desc_act: bool
    sym: bool
    zeros_offset_by_one: bool  # checkpoint_format "gptq" (v1) stores zero - 1; "gptq_v2" stores the zero
    # "compressed-tensors": its pack-quantized layout (weight_packed [N, K / pack], weight_scale [N, G], ...), read
    # into GPTQ's (the same words transposed); symmetric ones store no zero point (it is 2^(bits - 1)).
    # "awq": AutoAWQ's GEMM layout (codes packed along the output, in AWQ's order), repacked into GPTQ's.
    checkpoint: str = "gptq"

    method = "gptq"

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits


@dataclass(frozen=True)
class FP8Config:
    """float8_e4m3 weights with one fp32 scale per output channel: quantized from 16-bit weights at load
    (--quantization fp8), or read from an FP8 checkpoint (its per-tensor or per-channel `weight_scale`)."""

    checkpoint: str | None = None  # the checkpoint's quant_method ("fp8", "compressed-tensors"); None: 16-bit
    static_input_scale: bool = False  # the checkpoint has `input_scale` tensors (read, not used)

    method = "fp8"

    @property
    def from_checkpoint(self) -> bool:
        return self.checkpoint is not None


QuantConfig = GPTQConfig | FP8Config


def parse_quantization_config(raw: object, source: str) -> QuantConfig | None:
    """config.json's `quantization_config` (None when absent)."""
    if raw is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object, got {raw!r}")
    method = raw.get("quant_method")
    if method == "fp8":
        return _parse_fp8(raw, where)
    if method == "compressed-tensors":
        from engine.quantization.compressed_tensors import parse_compressed_tensors  # it builds these configs

        return parse_compressed_tensors(raw, where)
    if method == "awq":
        return _parse_awq(raw, where)
    if method != "gptq":
        raise ConfigError(f"{where}.quant_method {method!r} is not supported (supported: 'gptq', 'awq', 'fp8', "
                          "'compressed-tensors'; or serve a 16-bit checkpoint with --quantization fp8)")

    def field(name, kinds, default=None, required=False):
        if name not in raw or raw[name] is None:
            if required:
                raise ConfigError(f"{where}: missing field '{name}'")
            return default
        value = raw[name]
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ConfigError(f"{where}.{name} has the wrong type: {value!r}")
        return value

    bits = field("bits", (int,), required=True)
    if bits not in (4, 8):
        raise ConfigError(f"{where}.bits {bits} is not supported (supported: 4, 8)")
    group_size = field("group_size", (int,), -1)
    if group_size != -1 and (group_size < 32 or group_size % 32):
        raise ConfigError(f"{where}.group_size {group_size} is not supported (supported: -1 or a multiple of 32)")
    fmt = field("checkpoint_format", (str,), None) or field("format", (str,), "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{where}.checkpoint_format {fmt!r} is not supported (supported: 'gptq', 'gptq_v2')")
    pack_dtype = field("pack_dtype", (str,), "int32")
    if pack_dtype not in ("int32", "torch.int32"):
        raise ConfigError(f"{where}.pack_dtype {pack_dtype!r} is not supported (supported: 'int32')")
    if field("lm_head", (bool,), False):
        raise ConfigError(f"{where}.lm_head true (a quantized lm_head) is not supported")
    if field("dynamic", (dict,), None):
        raise ConfigError(f"{where}.dynamic (per-module overrides) is not supported")
    if field("modules_in_block_to_quantize", (list,), None) is not None:
        raise ConfigError(f"{where}.modules_in_block_to_quantize is not supported: every linear projection of "
                          "a block (attention q/k/v/o, Mamba in_proj/out_proj, MLP gate/up/down) must be quantized")
    known = {"quant_method", "bits", "group_size", "checkpoint_format", "format", "pack_dtype", "lm_head",
             "dynamic", "modules_in_block_to_quantize", "desc_act", "sym"} | _GPTQ_PROCESS_FIELDS
    unknown = sorted(set(raw) - known)
    if unknown:
        logger.warning("%s: ignoring fields %s (not known to change how GPTQ tensors are read)", where, unknown)
    return GPTQConfig(bits=bits, group_size=group_size, desc_act=field("desc_act", (bool,), False),
                      sym=field("sym", (bool,), True), zeros_offset_by_one=fmt == "gptq")


_PROJECTION = re.compile(r"(q|k|v|o|gate|up|down)_proj|in_proj|out_proj")
# Projection modules as Falcon-H1 / FalconMamba checkpoints name them, for matching "re:" ignore patterns.
_PROJECTION_MODULES = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"feed_forward.{p}_proj" for p in ("gate", "up",
                       "down")] + ["mamba.in_proj", "mamba.out_proj", "mixer.in_proj", "mixer.out_proj"]


def _parse_awq(raw: dict, where: str) -> GPTQConfig:
    """AutoAWQ's GEMM layout (transformers' AwqConfig, version "gemm"): `qweight` int32 [K, N / 8] and `qzeros`
    [G, N / 8] packed along the output in AWQ's order (engine/quantization/gptq.py AWQ_ORDER), `scales` fp16
    [G, N]; W = (q - zero) * scale. GPTQLinear repacks them into GPTQ's layout as they load."""
    bits = raw.get("bits", raw.get("w_bit"))
    if bits != 4:
        raise ConfigError(f"{where}.bits {bits!r} is not supported (supported: 4)")
    group_size = raw.get("group_size", raw.get("q_group_size"))
    if not isinstance(group_size, int) or group_size != -1 and (group_size < 32 or group_size % 32):
        raise ConfigError(f"{where}.group_size {group_size!r} is not supported (supported: -1 or a multiple of 32)")
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"{where}.version {version!r} is not supported (supported: 'gemm', AutoAWQ's default)")
    if raw.get("zero_point", True) is not True:
        raise ConfigError(f"{where}.zero_point {raw['zero_point']!r} is not supported (supported: true)")
    check_no_projection_ignored(raw.get("modules_to_not_convert"), f"{where}.modules_to_not_convert")
    unknown = sorted(set(raw) - _AWQ_FIELDS)
    if unknown:
        logger.warning("%s: ignoring fields %s (not known to change how AWQ tensors are read)", where, unknown)
    return GPTQConfig(bits=4, group_size=group_size, desc_act=False, sym=False, zeros_offset_by_one=False,
                      checkpoint="awq")


# AutoAWQ / transformers' AwqConfig fields: read above, or only about how to run it elsewhere (fusing, backends).
_AWQ_FIELDS = {"quant_method", "bits", "w_bit", "group_size", "q_group_size", "zero_point", "version",
               "modules_to_not_convert", "backend", "do_fuse", "fuse_max_seq_len", "modules_to_fuse", "exllama_config"}


def _parse_fp8(raw: dict, where: str) -> FP8Config:
    """vLLM's FP8 checkpoint format: per projection `weight` float8_e4m3fn [N, K] and `weight_scale` fp32
    (per tensor, or per output channel), plus `input_scale` with activation_scheme "static"."""
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ConfigError(f"{where}.activation_scheme {scheme!r} is not supported (supported: 'dynamic', 'static')")
    if raw.get("weight_block_size") is not None:
        raise ConfigError(f"{where}.weight_block_size (block-wise FP8 scales) is not supported")
    check_no_projection_ignored(raw.get("ignored_layers"), f"{where}.ignored_layers")
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{where}.fmt {fmt!r} is not supported (supported: 'e4m3')")
    if scheme == "static":
        logger.warning("%s.activation_scheme 'static': the checkpoint's input_scale tensors are read but not "
                       "used; activations are quantized per token at run time instead", where)
    return FP8Config(checkpoint="fp8", static_input_scale=scheme == "static")


def check_no_projection_ignored(ignored: object, where: str) -> None:
    """Layers a checkpoint leaves in 16 bits: names, or compressed-tensors' "re:" patterns; none may be one of
    the projections, which are all quantized or none (the lm_head may be, and is anyway)."""
    ignored = ignored or []
    if not isinstance(ignored, list):
        raise ConfigError(f"{where} must be a list, got {ignored!r}")
    for entry in map(str, ignored):
        if entry.startswith("re:"):
            pattern = re.compile(entry[3:])
            hit = any(pattern.match(f"model.layers.0.{name}") for name in _PROJECTION_MODULES)
        else:
            hit = bool(_PROJECTION.search(entry))
        if hit:
            raise ConfigError(f"{where} {entry!r}: every linear projection must be quantized here")


def resolve_quantization(checkpoint: QuantConfig | None, requested: str | None) -> QuantConfig | None:
    """What to run: the checkpoint's own quantization, checked against --quantization when one is given."""
    if requested is None:
        return checkpoint
    if requested not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {requested!r}")
    if requested != "fp8":  # gptq, awq, compressed-tensors: a check that the checkpoint is one, as in vLLM
        if getattr(checkpoint, "checkpoint", None) != requested:
            raise ConfigError(f"--quantization {requested}: the checkpoint has no {requested} quantization_config "
                              "in config.json")
        return checkpoint
    if isinstance(checkpoint, FP8Config):  # an FP8 checkpoint, and --quantization fp8 asked for
        return checkpoint
    if checkpoint is not None:
        raise ConfigError(f"--quantization fp8 quantizes 16-bit checkpoints; this one is already "
                          f"{checkpoint.method}-quantized")
    return FP8Config()
