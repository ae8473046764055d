"""Prefix caching for hybrid models: KV blocks shared by content and exact SSM-state checkpoints."""

from engine.prefix_cache.index import Node, PrefixIndex

__all__ = ["Node", "PrefixIndex"]
