"""What the routes share: settings, the engine once loaded, metrics, and the admission state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.errors import APIError
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.llm_engine import EngineStats


@dataclass
class ServerSettings:
    served_model_names: list[str]  # the first one names the model in /metrics
    model_path: str  # reported as `root` in /v1/models
    api_key: str | None = None
    max_queue_len: int | None = None  # queued sequences (prompts x n, not yet running) beyond which: 429
    max_request_body_bytes: int = 16 * 2**20  # larger bodies get 413 before they are read
    trust_request_chat_template: bool = False  # allow chat templates sent by clients (they are code)
    tool_call_parser: str | None = None  # how the model writes tool calls (server.tool_parsers)
    enable_auto_tool_choice: bool = False  # allow tool_choice "auto" (needs tool_call_parser)
    playground: bool = True  # serve the chat page at / and /playground
    runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter


@dataclass
class ServerState:
    settings: ServerSettings
    engine: AsyncEngine | None = None  # None until the weights are loaded
    load_error: BaseException | None = None
    draining: bool = False  # set on SIGTERM: finish what runs, admit nothing new
    requests_in_flight: int = 0  # HTTP requests being served (the drain waits for them)
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.settings.served_model_names[0], self.engine_stats)

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def unavailable_reason(self) -> str | None:
        """Why new work cannot be accepted right now, or None when it can."""
        if self.draining:
            return "The server is shutting down."
        if self.load_error is not None:
            return f"The model failed to load: {self.load_error}"
        if self.engine is None:
            return "The model is still loading; retry when GET /health returns 200."
        if self.engine.errored:
            return (f"The engine has stopped after an internal error ({self.engine.dead_reason}); "
                    "the server must be restarted.")
        return None

    def ready_engine(self) -> AsyncEngine:
        reason = self.unavailable_reason()
        if reason is not None or self.engine is None:
            raise APIError(503, reason or "The model is not loaded.")
        return self.engine

    def lora_adapters(self) -> dict:
        """The LoRA adapters requests may name: name -> engine.lora.LoRARequest."""
        lora = self.engine.engine.lora if self.engine is not None else None
        return lora.served() if lora is not None else {}

    def check_model(self, requested: str | None) -> str:
        """The model name to answer with (the base model or a LoRA adapter); 404 for a name this server does
        not serve (like OpenAI)."""
        names = self.settings.served_model_names
        if requested is None or requested in names:
            return requested or names[0]
        if requested in self.lora_adapters():
            return requested
        raise self._unknown_model(requested)

    def lora_id(self, model: str | None) -> int | None:
        """The adapter id a request for `model` (from check_model) runs with; None: the base model."""
        if model is None or model in self.settings.served_model_names:
            return None
        adapter = self.lora_adapters().get(model)
        if adapter is None:  # unloaded since check_model
            raise self._unknown_model(model)
        return adapter.lora_int_id

    def _unknown_model(self, requested: str) -> APIError:
        served = [*self.settings.served_model_names, *self.lora_adapters()]
        return APIError(404, f"The model `{requested}` does not exist. This server serves: {', '.join(served)}.",
                        param="model", code="model_not_found")
