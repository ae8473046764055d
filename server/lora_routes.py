"""LoRA adapters over HTTP, as vLLM serves them: /v1/models lists each adapter with its base model as
`parent`; with runtime updating on (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True or
--allow-runtime-lora-updating), POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove
adapters while serving. Requests name an adapter in `model`."""

from __future__ import annotations

import os

from fastapi import FastAPI
from starlette.responses import PlainTextResponse

from engine.lora import LoRAError, LoRARequest
from server.errors import APIError, bad_request
from server.generation import off_loop
from server.openapi import ERROR_RESPONSES
from server.protocol import ModelCard, RequestBody
from server.state import ServerState

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updating_from_env() -> bool:
    return os.environ.get(RUNTIME_UPDATING_ENV, "").strip().lower() in ("1", "true")


class LoadLoRAAdapterRequest(RequestBody):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's in-place reload of a loaded name: refused (unload it first)


class UnloadLoRAAdapterRequest(RequestBody):
    lora_name: str
    lora_int_id: int | None = None


def adapter_cards(state: ServerState, created: int, max_model_len: int) -> list[ModelCard]:
    base = state.settings.served_model_names[0]
    return [ModelCard(id=name, created=created, root=adapter.lora_path, parent=adapter.base_model_name or base,
                      max_model_len=max_model_len) for name, adapter in state.lora_adapters().items()]


def add_lora_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/load_lora_adapter", responses=ERROR_RESPONSES)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        engine = state.ready_engine().engine
        if engine.lora is None:
            raise bad_request("LoRA adapters are off: start the server with --enable-lora")
        if body.load_inplace:
            raise bad_request("load_inplace is not supported: unload the adapter, then load it again", "load_inplace")
        if body.lora_name in state.settings.served_model_names or body.lora_name in state.lora_adapters():
            raise bad_request(f"The model name `{body.lora_name}` is already in use.", "lora_name")
        try:
            request = LoRARequest(body.lora_name, engine.lora.next_id(), body.lora_path)
            await off_loop(engine.add_lora, request)  # reads and checks the files
        except LoRAError as e:
            raise bad_request(str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", responses=ERROR_RESPONSES)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        engine = state.ready_engine().engine
        adapter = state.lora_adapters().get(body.lora_name)
        if engine.lora is None or adapter is None or body.lora_int_id not in (None, adapter.lora_int_id):
            raise APIError(404, f"The LoRA adapter `{body.lora_name}` is not loaded.", param="lora_name",
                           code="model_not_found")
        engine.lora.remove(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
