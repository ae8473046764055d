"""What names an adapter: vLLM's LoRARequest(lora_name, lora_int_id, lora_path)."""

from __future__ import annotations

from dataclasses import dataclass


class LoRAError(ValueError):
    """An adapter that cannot be served (bad files, unsupported options, rank over --max-lora-rank)."""


@dataclass(frozen=True)
class LoRAModulePath:
    """An adapter to serve from start-up (vLLM's --lora-modules name=path or its JSON form)."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int  # the adapter's identity: requests with the same id share one loaded copy
    lora_path: str  # local PEFT adapter directory or hub repo id
    base_model_name: str | None = None  # what /v1/models lists as its parent (default: the served model)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise LoRAError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise LoRAError("lora_name must not be empty")
