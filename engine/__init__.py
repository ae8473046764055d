"""falcon-serve's engine: models, caches, scheduling and sampling for hybrid SSM language models."""

from __future__ import annotations

import importlib
from typing import Any

# Public names, imported on first use: `engine.config` (the CLI's flags) must not pull in torch.
_EXPORTS = {
    "LLM": "engine.llm", "EngineArgs": "engine.config", "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.structured_output.params", "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs", "StepOutput": "engine.outputs", "Logprob": "engine.outputs",
    "LoRARequest": "engine.lora.request",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
