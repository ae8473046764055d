"""Constrained decoding with llguidance: what a request asks for (`StructuredOutputsParams`), grammars
compiled once per spec (`GrammarCompiler`), and the packed token bitmask the sampler applies."""

from engine.structured_output.bitmask import apply_token_bitmask
from engine.structured_output.compiler import GrammarCompiler
from engine.structured_output.params import StructuredOutputsParams

__all__ = ["GrammarCompiler", "StructuredOutputsParams", "apply_token_bitmask"]
