"""falcon-serve's engine: models, caches, scheduling and sampling for hybrid SSM language models."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any


def _check_kernels_package() -> None:
    """ImportError, saying why, when the top-level `kernels` is not the one beside this package: another
    distribution of that name (Hugging Face's `kernels`, which transformers >= 5.25 installs) comes first on
    the path, and every model would fail later on a missing kernels.<module>."""
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != ours:
        found = "nothing" if spec is None else spec.origin
        raise ImportError(f"falcon-serve's `kernels` package ({ours.parent}) is shadowed by {found}: another "
                          "installed package is named `kernels` (Hugging Face's is, a dependency of transformers "
                          ">= 5.25). Run falcon-serve in an environment without it (pip uninstall kernels).")


_check_kernels_package()

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
