"""Quantized weights: GPTQ Int4 / Int8 checkpoints and FP8 quantization at load (DESIGN.md, "Quantized weights")."""

from engine.quantization.config import (
                                        QUANTIZATION_METHODS,
                                        FP8Config,
                                        GPTQConfig,
                                        QuantConfig,
                                        parse_quantization_config,
                                        resolve_quantization,
)
from engine.quantization.layers import QUANTIZED_LINEARS, ConcatLinear, fuse_quantized, linear

__all__ = ["QUANTIZATION_METHODS", "QUANTIZED_LINEARS", "ConcatLinear", "FP8Config", "GPTQConfig", "QuantConfig",
           "fuse_quantized", "linear", "parse_quantization_config", "resolve_quantization"]
