"""Tool-call formats: how a model writes calls (the grammar that enforces it) and how they are read back."""

from server.tool_parsers.hermes import HermesToolParser

TOOL_PARSERS = {"hermes": HermesToolParser}

__all__ = ["TOOL_PARSERS", "HermesToolParser"]
