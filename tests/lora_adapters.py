"""PEFT adapters on the tiny checkpoints (random, nonzero lora_B) and transformers+peft's greedy outputs."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

# Target sets as users write them (a list of names or one regex).
H1_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "mamba": r".*\.mamba\.(in_proj|out_proj)",
    "all": r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj|out_proj)",
    "some_slices": ["k_proj", "up_proj"],
}
MAMBA_TARGETS = {
    "in_x_dt": ["in_proj", "x_proj", "dt_proj"],
    "all": r".*\.mixer\.(in_proj|x_proj|dt_proj|out_proj)",
}


@contextlib.contextmanager
def _any_target(model):
    model_type = model.config.model_type
    model.config.model_type = "reference"  # not one of the Mamba types PEFT checks
    try:
        yield
    finally:
        model.config.model_type = model_type


@torch.no_grad()
def build_adapter(base_dir: Path, directory: Path, target_modules, r: int = 8, alpha: float = 16,
                  use_rslora: bool = False, seed: int = 0, std: float = 0.3) -> Path:
    """An adapter saved by peft, with random A and B (PEFT starts B at zero, which would hide everything)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        lora_dropout=0.0)
    # PEFT refuses out_proj on Mamba-type models because mamba-ssm's CUDA path reads out_proj.weight and
    # skips the adapter; transformers' torch path (the CPU reference here) calls the module, so it is exact.
    with _any_target(model):
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * std / p.shape[-1] ** 0.5)
    peft_model.save_pretrained(directory)
    return Path(directory)


@functools.lru_cache(maxsize=16)
def _peft_model(base_dir: Path, adapter_dir: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    with _any_target(model):
        return PeftModel.from_pretrained(model, adapter_dir).eval()


@torch.no_grad()
def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], max_tokens: int
                ) -> tuple[list[int], list[float]]:
    """transformers+peft's greedy continuation (full forward each step) and each token's logprob."""
    model = _peft_model(Path(base_dir), Path(adapter_dir) if adapter_dir is not None else None)
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        ids.append(token)
    return tokens, logprobs
