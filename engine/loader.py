"""Finding a checkpoint (local directory or hub repo id) and loading its safetensors into a model."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from engine.config import ModelConfig
from engine.distributed import SINGLE, TensorParallel
from engine.models import MODEL_REGISTRY
from engine.quantization import QUANTIZED_LINEARS, part_modules
from engine.quantization.fused import copy_checked

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


class LoadError(ValueError):
    pass


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (or found in the HF cache offline)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise LoadError(f"model path {model!r} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as online_error:  # offline, or no access: fall back to the local cache
        try:
            return Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS,
                                          local_files_only=True))
        except Exception:
            raise LoadError(f"cannot find model {model!r}: not a local directory, and the hub download "
                            f"failed ({online_error}) with nothing cached") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index}: missing 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no .safetensors files in {model_dir}")
    return files


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights as stored: parameters and buffers (quantized layers keep theirs as buffers)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS)]


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights with the checkpoint's shapes: enough for benchmarks, where the work per token is
    the same. SSM parameters get values in their usual ranges so the recurrence stays stable."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.uniform_(0.0, 2.0, generator=generator)
        elif name.endswith(("D", "dt_bias", "dt_proj.bias")) or "norm" in name:
            p.uniform_(0.5, 1.5, generator=generator)
        else:
            p.normal_(0.0, 0.02, generator=generator)
    for _, layer in _quantized_layers(model):
        layer.init_dummy(generator)


def checkpoint_modules(model: nn.Module) -> dict[str, tuple[nn.Module, int | None]]:
    """Checkpoint module name -> (the module its tensors are loaded into, which of its parts; None: a module
    without parts). A fused projection (engine/quantization/fused.py) stands for each of its parts."""
    found: dict[str, tuple[nn.Module, int | None]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if hasattr(module, "parts"):
            found |= {name: (module, i) for i, (name, _) in enumerate(part_modules(path, module))}
        else:
            found[path] = (module, None)
    return found


def _copy_into(modules: dict[str, tuple[nn.Module, int | None]], target: str, tensor: torch.Tensor,
               source: str) -> None:
    """Checkpoint tensor `target` = tensor: a parameter or buffer, or through its module's load_tensor hook
    (a fused projection's part; FP8 quantizes there). `source` names the checkpoint tensor and file, for errors."""
    owner, _, local = target.rpartition(".")
    module, part = modules[owner]
    try:
        if part is None:
            copy_checked(getattr(module, local), tensor)
        else:
            module.load_tensor(local, tensor, part)
    except ValueError as e:
        raise LoadError(f"tensor {source} {e} (check config.json)") from None


def check_tensor_parallel(arch: str, cfg: ModelConfig, size: int) -> None:
    """ValueError (LoadError) saying why, if the model cannot be split over `size` ranks."""
    if size > 1 and cfg.quantization is not None:
        raise LoadError(f"{cfg.quantization.method}-quantized weights cannot be split over tensor-parallel ranks "
                        "yet: serve them with tensor_parallel_size 1")
    MODEL_REGISTRY[arch].shard_config(cfg, TensorParallel(0, size))


def load_model(model_dir: Path, arch: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               dummy: bool = False, tp: TensorParallel = SINGLE) -> nn.Module:
    """Builds the model in `dtype` on `device` (A_log, D, dt_bias stay fp32) and fills it from the checkpoint;
    under tensor parallelism, with this rank's shard of each tensor.

    Each checkpoint tensor goes through the model's `load_transform` (in fp32) before the cast, so
    folded multipliers lose no precision, and is sharded after; a fused projection's part lands in its own
    rows of the fused layer. Missing, unexpected or mis-shaped tensors are errors.
    """
    check_tensor_parallel(arch, cfg, tp.size)
    with _default_dtype(dtype), torch.device(device):
        model = MODEL_REGISTRY[arch](cfg, tp)
    if dummy:
        init_dummy_weights(model)
        model.finalize_weights()
        return model.eval()
    modules = checkpoint_modules(model)
    expected = model.checkpoint_names()
    seen: set[str] = set()
    unexpected: list[str] = []
    files = safetensors_files(model_dir)
    with torch.no_grad():
        for file in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name not in expected and name != "lm_head.weight":
                        unexpected.append(name)
                        continue
                    seen.add(name)
                    stored = f.get_tensor(name)
                    if stored.is_floating_point() and stored.dtype.itemsize > 1:  # GPTQ / FP8 codes stay as they are
                        stored = stored.float()
                    for target, tensor in model.load_transform(name, stored):
                        _copy_into(modules, target, model.shard_tensor(target, tensor), f"{name!r} in {file.name}")
    optional = {f"{name}.{t}" for name, (module, _) in modules.items()
                for t in getattr(module, "optional_checkpoint_tensors", ())}
    missing = sorted(expected - seen - optional)
    if missing or unexpected:
        quantized = any(n.endswith((".qweight", ".weight_scale")) for n in [*missing, *unexpected])
        raise LoadError(f"checkpoint {model_dir} does not match {arch}: "
                        f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                        f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                        + ("; quantized layers (GPTQ qweight, FP8 weight_scale) are expected exactly where "
                           "config.json's quantization_config says: attention q/k/v/o, Mamba in_proj/out_proj, MLP "
                           "gate/up/down (FalconMamba's x_proj and dt_proj stay 16-bit)" if quantized else ""))
    for name, layer in _quantized_layers(model):
        try:
            layer.finalize([module for module, _ in part_modules(name, layer)])
        except ValueError as e:
            raise LoadError(f"checkpoint {model_dir}: {e}") from None
    model.finalize_weights()
    logger.info("loaded %s from %s: %.2f GB of weights in %s%s", arch, model_dir, model_weight_bytes(model) / 1e9,
                dtype, f", {cfg.quantization.method}-quantized projections" if cfg.quantization else "")
    return model.eval()
