"""Reading a PEFT LoRA adapter: adapter_config.json and adapter_model.safetensors, from a local directory or a
hub repo id, into per-module (A, B) pairs ready for the device stacks.

PEFT's forward of a targeted linear is  y = W x + scaling * B (A x),  scaling = lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r)). Falcon-H1 folds its multipliers into W at load time (W' = m_out * W * m_in); the same
multipliers scale the adapter's delta, so B' = scaling * m_out * m_in * B and the forward adds (x A^T) B'^T.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import read_json_object
from engine.lora.request import LoRAError, LoRARequest

logger = logging.getLogger(__name__)

_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
# Options that change what an adapter computes and are not implemented: refused, never ignored.
_UNSUPPORTED = {
    "fan_in_fan_out": "weights stored transposed (Conv1D layers)",
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters instead of modules",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "megatron_config": "Megatron parallel layers",
}


@dataclass
class AdapterWeights:
    request: LoRARequest
    rank: int  # the largest r over its modules
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B' [out, r]), fp32 on the CPU

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def resolve_adapter_path(path: str) -> Path:
    """A local directory as is, else a hub repo id (downloaded, or found in the cache offline)."""
    from engine.loader import LoadError, resolve_model_path

    try:
        return resolve_model_path(path)
    except LoadError as e:
        raise LoRAError(f"LoRA adapter {path!r}: {e}") from None


def read_adapter_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    raw = read_json_object(path, LoRAError, f"{directory} is not a PEFT adapter: no adapter_config.json")
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRAError(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    if raw.get("bias", "none") != "none":
        raise LoRAError(f"{path}: bias {raw['bias']!r} is not supported (only 'none': the adapter must not train "
                        "the base model's biases)")
    if raw.get("modules_to_save"):
        raise LoRAError(f"{path}: modules_to_save {raw['modules_to_save']} (fully trained copies of modules, e.g. "
                        "lm_head) is not supported; merge those modules into the base model instead")
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise LoRAError(f"{path}: {key} = {raw[key]!r} ({what}) is not supported")
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise LoRAError(f"{path}: target_modules must be a list of names or a regex string, got {targets!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(raw.get(key) or {}, dict):
            raise LoRAError(f"{path}: {key} must be an object")
    return raw


def _is_targeted(targets: str | list | None, module: str) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list entry its last components."""
    if targets is None:  # PEFT's per-architecture default; the saved tensors say which modules
        return True
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern as PEFT matches them: the first key that ends the module name (a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(request: LoRARequest, shapes: dict[str, tuple[int, int]], max_rank: int,
                 multiplier: Callable[[str], float | torch.Tensor | None], inert: dict[str, str] | None = None
                 ) -> AdapterWeights:
    """Reads and checks an adapter. shapes: every module an adapter may target -> (in_features, out_features),
    named as in the base checkpoint. multiplier(module): what the model folds into that module's weight.
    inert: projections (last name component -> why) whose adapters transformers never applies: skipped."""
    directory = resolve_adapter_path(request.lora_path)
    config = read_adapter_config(directory)
    file = directory / "adapter_model.safetensors"
    if not file.exists():
        hint = " (adapter_model.bin is pickle: save it with safe_serialization=True)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise LoRAError(f"LoRA adapter {request.lora_name!r}: no adapter_model.safetensors in {directory}{hint}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            match = _TENSOR_NAME.match(name)
            if match is None:
                raise LoRAError(f"LoRA adapter {request.lora_name!r}: tensor {name!r} is not a LoRA A/B weight "
                                "(embedding adapters, DoRA magnitudes and saved modules are not supported)")
            pairs.setdefault(match["module"], {})[match["kind"]] = f.get_tensor(name).float()
    if not pairs:
        raise LoRAError(f"LoRA adapter {request.lora_name!r}: {file} holds no LoRA weights")
    modules, rank, skipped = {}, 0, set()
    for module, pair in sorted(pairs.items()):
        where = f"LoRA adapter {request.lora_name!r}, module {module!r}"
        kind = module.rsplit(".", 1)[-1]
        if inert and kind in inert:
            skipped.add(kind)
            continue
        if module not in shapes:
            raise LoRAError(f"{where}: not a projection falcon-serve can apply an adapter to (those are: "
                            f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in shapes}))})")
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"{where}: lora_A and lora_B must both be present")
        if not _is_targeted(config.get("target_modules"), module):
            raise LoRAError(f"{where}: has weights but adapter_config.json's target_modules does not name it")
        a, b = pair["A"], pair["B"]
        in_features, out_features = shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or tuple(b.shape) != (out_features, r):
            raise LoRAError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                            f"model's {out_features} x {in_features} weight with a common rank")
        if r > max_rank:
            raise LoRAError(f"LoRA adapter {request.lora_name!r} has rank {r} (module {module!r}), more than "
                            f"--max-lora-rank {max_rank}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", config["r"]))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        m = multiplier(module)
        if m is not None:
            b = b * (m[:, None] if torch.is_tensor(m) else m)
        modules[module] = (a.contiguous(), (b * scaling).contiguous())
        rank = max(rank, r)
    for kind in sorted(skipped):
        logger.warning("LoRA adapter %r: its %s weights are not applied: %s", request.lora_name, kind, inert[kind])
    return AdapterWeights(request, rank, modules)
