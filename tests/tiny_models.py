"""Tiny random checkpoints written by transformers (the reference) with a byte-level tokenizer built
in code, and transformers' own greedy continuation / logprobs to compare against."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from engine.tokenizer import byte_level_tokenizer_files

VOCAB = 300  # the byte-level tokenizer's 261 tokens, padded like real vocabularies are
EOS = 2
# The GPU share of an engine in a GPU test: the suite runs six xdist workers, some with two engines at once,
# on one GPU, and an engine takes its whole share (KV blocks, checkpoints) up front.
GPU_TEST_MEMORY = 0.08

# Multipliers far from 1 so that a missed or doubled fold changes the outputs.
H1_MULTIPLIERS = dict(
    embedding_multiplier=2.5, lm_head_multiplier=0.7, key_multiplier=0.6, attention_in_multiplier=1.3,
    attention_out_multiplier=0.8, ssm_in_multiplier=1.25, ssm_out_multiplier=0.5,
    ssm_multipliers=[0.6, 1.4, 0.8, 1.7, 0.9], mlp_multipliers=[1.2, 0.6],
)


def falcon_h1_config(**overrides):
    from transformers import FalconH1Config

    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24,  # head_dim * heads != hidden
        mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=16,
        mamba_d_conv=4, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
        max_position_embeddings=512, rope_theta=1e4, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        initializer_range=0.2, tie_word_embeddings=False, **H1_MULTIPLIERS,
    )
    fields.update(overrides)
    return FalconH1Config(**fields)


def falcon_mamba_config(**overrides):
    from transformers import FalconMambaConfig

    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, state_size=8,
                  conv_kernel=4, time_step_rank=6, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
                  initializer_range=0.2, tie_word_embeddings=False, use_mambapy=False,
                  use_associative_scan=False)
    fields.update(overrides)
    return FalconMambaConfig(**fields)


@torch.no_grad()
def build_checkpoint(directory: Path, config, seed: int = 0) -> Path:
    """Random weights (with non-trivial A_log, D, dt_bias, norms) saved with save_pretrained in fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.rand_like(p) * 2 - 0.5)
        elif name.endswith((".D", "dt_bias", "dt_proj.bias")):
            p.copy_(torch.randn_like(p) * 0.5)
        elif "norm" in name:
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif name.endswith("bias"):  # init leaves biases at zero, which would hide a missed one
            p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    byte_level_tokenizer_files(directory)
    return Path(directory)


@torch.no_grad()
def reference_greedy(directory: Path, prompt: list[int], max_tokens: int, logprobs: bool = False):
    """transformers' greedy continuation (full forward each step, no cache) and each token's logprob."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ids = list(prompt)
    tokens, lps = [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        lps.append(float(logits.log_softmax(-1)[token]))
        ids.append(token)
    return (tokens, lps) if logprobs else tokens


def rewrite_config(directory: Path, **changes) -> None:
    path = Path(directory) / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@functools.lru_cache(maxsize=4)
def reference_model(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()


@torch.no_grad()
def reference_prompt_logprobs(directory: Path, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every prompt position: row p is the distribution of token p+1."""
    return reference_model(Path(directory))(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
