"""compressed-tensors checkpoints as llm-compressor writes them, read as the layers here already hold them: its
float-quantized FP8 as FP8Linear's, its pack-quantized integers as GPTQLinear's (the same words, transposed)."""

from __future__ import annotations

import logging

from engine.config import ConfigError
from engine.quantization.config import FP8Config, GPTQConfig, QuantConfig, check_no_projection_ignored
from kernels.fp8_linear import SCALED_MM_MIN_ROWS

logger = logging.getLogger(__name__)

# llm-compressor's preset names, as config_groups may give them (group name -> targets), and what they stand for.
_FP8_ARGS = dict(num_bits=8, type="float", symmetric=True, dynamic=False)
_INT_ARGS = dict(type="int", strategy="group", group_size=128, symmetric=True, dynamic=False)
PRESETS = {
    "FP8": dict(weights=dict(_FP8_ARGS, strategy="tensor"), input_activations=dict(_FP8_ARGS, strategy="tensor")),
    "FP8_DYNAMIC": dict(weights=dict(_FP8_ARGS, strategy="channel"),
                        input_activations=dict(_FP8_ARGS, strategy="token", dynamic=True)),
    "W4A16": dict(weights=dict(_INT_ARGS, num_bits=4)),
    "W4A16_ASYM": dict(weights=dict(_INT_ARGS, num_bits=4, symmetric=False)),
    "W8A16": dict(weights=dict(_INT_ARGS, num_bits=8)),
}
# compressed-tensors formats read here, and the weight type each holds
FORMATS = {"float-quantized": "float", "pack-quantized": "int"}


def _check_args(args: object, where: str, kind: str, bits: tuple[int, ...], strategies: tuple[str, ...],
                   symmetric: tuple[bool, ...] = (True,)) -> dict:
    """compressed-tensors QuantizationArgs that the layers read as stored: `kind` ("float": e4m3, "int") codes of
    one of `bits`, one scale per tensor, output channel, token or group of input channels."""
    if not isinstance(args, dict):
        raise ConfigError(f"{where} must be an object, got {args!r}")
    checks = (("type", (kind,)), ("num_bits", bits), ("symmetric", symmetric), ("strategy", strategies))
    for name, allowed in checks:
        if args.get(name, True if name == "symmetric" else None) not in allowed:  # the others written always
            raise ConfigError(f"{where}.{name} {args.get(name)!r} is not supported here (supported: "
                              f"{', '.join(map(repr, allowed))})")
    if args.get("block_structure") is not None:
        raise ConfigError(f"{where}.block_structure {args['block_structure']!r} is not supported")
    if args.get("strategy") != "group" and args.get("group_size") is not None:
        raise ConfigError(f"{where}.group_size {args['group_size']!r} is not supported without strategy 'group'")
    return args


def parse_compressed_tensors(raw: dict, where: str) -> QuantConfig:
    """compressed-tensors, as llm-compressor writes it: one config group targeting every Linear, in one of two
    formats. "float-quantized" (its FP8, FP8_DYNAMIC and FP8 weight-only schemes): per projection `weight`
    float8_e4m3fn and `weight_scale` ([1] per tensor or [N, 1] per channel), `input_scale` with static input
    activations. "pack-quantized" (W4A16, W8A16, GPTQ or not): `weight_packed` int32 [N, K / (32 / bits)] (codes
    + 2^(bits - 1) packed along the input, lowest bits first), `weight_scale` [N, G], `weight_zero_point` packed
    along the output when asymmetric, `weight_shape`, `weight_g_idx` with act-order. Other formats, schemes and
    fields that change what the tensors mean are refused by name."""
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format {fmt!r} is not supported (supported: {', '.join(map(repr, FORMATS))})")
    if raw.get("quantization_status", "compressed") != "compressed":
        raise ConfigError(f"{where}.quantization_status {raw['quantization_status']!r} is not supported (supported: "
                          "'compressed', weights stored as codes)")
    if raw.get("kv_cache_scheme") is not None:
        raise ConfigError(f"{where}.kv_cache_scheme (a quantized KV cache) is not supported")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ConfigError(f"{where}.config_groups: one group (one scheme for every projection) is supported, got "
                          f"{groups!r}")
    check_no_projection_ignored(raw.get("ignore"), f"{where}.ignore")
    (name, scheme), = groups.items()
    where = f"{where}.config_groups.{name}"
    if isinstance(scheme, list):  # a preset's name, mapped to its targets
        if name.upper() not in PRESETS:
            raise ConfigError(f"{where}: preset {name!r} is not supported (supported: {', '.join(PRESETS)})")
        scheme = dict(PRESETS[name.upper()], targets=scheme)
    if not isinstance(scheme, dict):
        raise ConfigError(f"{where} must be an object, got {scheme!r}")
    if scheme.get("targets") != ["Linear"]:
        raise ConfigError(f"{where}.targets {scheme.get('targets')!r} is not supported (supported: ['Linear'], "
                          "every linear projection)")
    if scheme.get("format") not in (None, fmt):
        raise ConfigError(f"{where}.format {scheme['format']!r} is not supported (supported: {fmt!r}, the config's)")
    if scheme.get("output_activations") is not None:
        raise ConfigError(f"{where}.output_activations (quantized outputs) is not supported")
    if FORMATS[fmt] == "int":
        return _integer_weights(scheme, where)
    return _fp8_weights(scheme, where)


def _integer_weights(scheme: dict, where: str) -> GPTQConfig:
    """pack-quantized: integer weights, 16-bit activations (GPTQ's kernels)."""
    weights = _check_args(scheme.get("weights"), f"{where}.weights", "int", (4, 8), ("group", "channel"),
                          (True, False))
    if scheme.get("input_activations") is not None:
        raise ConfigError(f"{where}.input_activations (quantized activations with integer weights) is not supported")
    if weights.get("dynamic", False) is not False:
        raise ConfigError(f"{where}.weights.dynamic {weights['dynamic']!r} is not supported (supported: false)")
    group_size = weights.get("group_size") if weights["strategy"] == "group" else -1
    if group_size != -1 and (not isinstance(group_size, int) or group_size < 32 or group_size % 32):
        raise ConfigError(f"{where}.weights.group_size {group_size!r} is not supported (supported: a multiple of 32)")
    actorder = weights.get("actorder")
    if actorder not in (None, "group", "weight", "static", "dynamic"):
        raise ConfigError(f"{where}.weights.actorder {actorder!r} is not supported")
    # "group" (or "dynamic") stores weight_g_idx; "weight" / "static" only changed the order GPTQ ran in
    return GPTQConfig(bits=weights["num_bits"], group_size=group_size,
                      desc_act=actorder in ("group", "dynamic"), sym=weights.get("symmetric", True),
                      zeros_offset_by_one=False, checkpoint="compressed-tensors")


def _fp8_weights(scheme: dict, where: str) -> FP8Config:
    """float-quantized: FP8 weights; activations as every FP8 model here runs them (logged when that differs)."""
    weights = _check_args(scheme.get("weights"), f"{where}.weights", "float", (8,), ("tensor", "channel"))
    if weights.get("dynamic", False) is not False:
        raise ConfigError(f"{where}.weights.dynamic {weights['dynamic']!r} is not supported (supported: false)")
    if weights.get("actorder") is not None:
        raise ConfigError(f"{where}.weights.actorder {weights['actorder']!r} is not supported")
    inputs = scheme.get("input_activations")
    if inputs is not None:
        _check_args(inputs, f"{where}.input_activations", "float", (8,), ("tensor", "token"))
    static = inputs is not None and inputs.get("dynamic", False) is False
    if static and inputs["strategy"] != "tensor":
        raise ConfigError(f"{where}.input_activations: static scales per {inputs['strategy']} are not supported")
    if inputs is None or inputs["strategy"] != "token":
        scheme_name = "none (weight-only)" if inputs is None else f"{'static' if static else 'dynamic'} per tensor"
        logger.warning("%s.input_activations %s: activations are quantized per token at %d rows and more, as for "
                       "every FP8 model here (below, not at all)%s", where, scheme_name, SCALED_MM_MIN_ROWS,
                       "; the checkpoint's input_scale tensors are read but not used" if static else "")
    return FP8Config(checkpoint="compressed-tensors", static_input_scale=static)
