"""LoRA adapters (PEFT format) served per request on one base model, many in one batch."""

from engine.lora.request import LoRAError, LoRAModulePath, LoRARequest

__all__ = ["LoRAError", "LoRAModulePath", "LoRARequest"]
