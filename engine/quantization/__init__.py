"""Quantized weights: GPTQ Int4 / Int8 checkpoints and FP8 quantization at load (DESIGN.md, "Quantized weights")."""

from engine.quantization.config import (
                                        QUANTIZATION_METHODS,
                                        FP8Config,
                                        GPTQConfig,
                                        QuantConfig,
                                        parse_quantization_config,
                                        resolve_quantization,
)
from engine.quantization.fused import Part, part_modules
from engine.quantization.layers import QUANTIZED_LINEARS, FusedLinear, fused_linear, linear

__all__ = ["QUANTIZATION_METHODS", "QUANTIZED_LINEARS", "FP8Config", "FusedLinear", "GPTQConfig", "Part", "QuantConfig",
           "fused_linear", "linear", "parse_quantization_config", "part_modules", "resolve_quantization"]
