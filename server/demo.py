"""The built-in demo model: a tiny Falcon-H1 with random weights, so `falcon-serve` works anywhere.

Its output is random noise. It exists so that a newcomer's first command starts a working server
on any machine (CPU included) without downloading anything. The checkpoint is an ordinary HF
directory (config.json, model.safetensors, tokenizer files), written without transformers,
deterministically from a seed, and cached after the first start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.tokenizer import Tokenizer, byte_level_tokenizer_files

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "falcon-serve-demo"
DEMO_VERSION = "demo-v2"  # bump when the files change, so stale caches are not reused
DEMO_NOTICE = (
    "Serving the built-in demo model '%s': a tiny Falcon-H1 with RANDOM weights. Its output is random "
    "noise; it only shows that the server works. To serve a real model, pass --model, e.g. "
    "`falcon-serve --model tiiuae/Falcon-H1-0.5B-Instruct` or `--model /path/to/checkpoint`."
)

# ChatML with tools the way Falcon-H1-Instruct's own template does it: the tools' JSON in the system
# turn, calls as Hermes-style <tool_call> blocks, tool results as <tool_response> blocks in a user turn.
CHAT_TEMPLATE = """\
{%- set rest = messages[1:] if messages and messages[0].role == 'system' else messages %}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'You are a function calling AI model. You are provided with function signatures within <tools></tools> '
    'XML tags. You may call one or more functions to assist with the user query. Do not make assumptions '
    'about what values to plug into functions.\\n<tools>\\n' }}
{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}
{{- '</tools>\\nFor each function call, return a JSON object with the function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in rest %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for tool_call in message.tool_calls or [] %}
{%- set call = tool_call.function %}
{{- ('\\n' if message.content or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + call.name
    + '\", \"arguments\": ' + (call.arguments if call.arguments is string else call.arguments | tojson)
    + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOKENIZER_MERGES = 64  # a few byte-pair merges: shorter prompts, faster CPU serving

# Small but complete: every part of the architecture is present (GQA attention, Mamba2 mixer with
# gated RMS norm, SwiGLU MLP), with published-style flags. Multipliers stay 1.0 so random logits
# stay well separated (greedy decoding is then stable across batch shapes).
ARCHITECTURE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "mamba_d_ssm": 128,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_chunk_size": 32,
    "max_position_embeddings": 4096,
}
LOGIT_STD = 4.0  # spread of the random logits


def demo_config(vocab_size: int, bos_token_id: int, eos_token_ids: list[int], pad_token_id: int) -> dict:
    """config.json with every field of transformers' FalconH1Config."""
    return {
        "architectures": ["FalconH1ForCausalLM"],
        "model_type": "falcon_h1",
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        **ARCHITECTURE,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "use_cache": True,
        "num_logits_to_keep": 1,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_ids,
        "attention_dropout": 0.0,
        "attention_bias": False,
        "mlp_bias": False,
        "mamba_expand": 2,  # ignored: mamba_d_ssm is set
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_norm_before_gate": False,
        "mamba_rms_norm": True,
        "time_step_limit": [0.0, math.inf],
        "projectors_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e11},
        "lm_head_multiplier": 1.0,
        "embedding_multiplier": 1.0,
        "mlp_multipliers": [1.0, 1.0],
        "key_multiplier": 1.0,
        "attention_out_multiplier": 1.0,
        "attention_in_multiplier": 1.0,
        "ssm_multipliers": [1.0, 1.0, 1.0, 1.0, 1.0],
        "ssm_in_multiplier": 1.0,
        "ssm_out_multiplier": 1.0,
        "dtype": "float32",
    }


def demo_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with the checkpoint names and shapes of Falcon-H1 (fan-in scaled, Mamba2-style
    dt and A init), drawn in a fixed order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def uniform(n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    d, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    d_ssm, heads, groups = config["mamba_d_ssm"], config["mamba_n_heads"], config["mamba_n_groups"]
    d_state, d_conv = config["mamba_d_state"], config["mamba_d_conv"]
    q_heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    conv_dim = d_ssm + 2 * groups * d_state

    w = {"model.embed_tokens.weight": normal(vocab, d, std=1.0)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        dt = torch.exp(uniform(heads, math.log(1e-3), math.log(1e-1)))
        w |= {
            p + "input_layernorm.weight": torch.ones(d),
            p + "pre_ff_layernorm.weight": torch.ones(d),
            p + "mamba.in_proj.weight": normal(2 * d_ssm + 2 * groups * d_state + heads, d, std=d ** -0.5),
            p + "mamba.conv1d.weight": normal(conv_dim, 1, d_conv, std=d_conv ** -0.5),
            p + "mamba.conv1d.bias": normal(conv_dim, std=0.1),
            p + "mamba.dt_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(dt_bias) = dt
            p + "mamba.A_log": torch.log(uniform(heads, 1.0, 16.0)),
            p + "mamba.D": torch.ones(heads),
            p + "mamba.norm.weight": torch.ones(d_ssm),
            p + "mamba.out_proj.weight": normal(d, d_ssm, std=d_ssm ** -0.5),
            p + "self_attn.q_proj.weight": normal(q_heads * head_dim, d, std=d ** -0.5),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, d, std=d ** -0.5),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, d, std=d ** -0.5),
            p + "self_attn.o_proj.weight": normal(d, q_heads * head_dim, std=(q_heads * head_dim) ** -0.5),
            p + "feed_forward.gate_proj.weight": normal(inter, d, std=d ** -0.5),
            p + "feed_forward.up_proj.weight": normal(inter, d, std=d ** -0.5),
            p + "feed_forward.down_proj.weight": normal(d, inter, std=inter ** -0.5),
        }
    w["model.final_layernorm.weight"] = torch.ones(d)
    w["lm_head.weight"] = normal(vocab, d, std=LOGIT_STD * d ** -0.5)
    return w


def build_demo_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write the demo checkpoint (or, with another seed, a different tiny model of the same shape)."""
    directory = Path(directory)
    byte_level_tokenizer_files(directory, merges=TOKENIZER_MERGES, chat_template=CHAT_TEMPLATE)
    tokenizer = Tokenizer.from_pretrained(directory)
    assert tokenizer.bos_token_id is not None and tokenizer.pad_token_id is not None
    config = demo_config(tokenizer.vocab_size, tokenizer.bos_token_id, sorted(tokenizer.eos_token_ids),
                         tokenizer.pad_token_id)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(demo_weights(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def cache_root() -> Path:
    return Path(os.environ.get("FALCON_SERVE_CACHE") or Path.home() / ".cache" / "falcon-serve")


def demo_model_dir() -> Path:
    """The cached demo checkpoint, built on first use (atomically, so concurrent starts are safe)."""
    final = cache_root() / DEMO_VERSION
    if (final / "model.safetensors").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=final.parent))
    except OSError as e:  # e.g. a read-only home in a container: build it where we can
        fallback = Path(tempfile.mkdtemp(prefix="falcon-serve-demo-"))
        logger.warning("cannot write the demo model cache %s (%s); building it in %s", final, e, fallback)
        return build_demo_checkpoint(fallback)
    logger.info("building the demo model in %s (first start only)", final)
    build_demo_checkpoint(staging)
    try:
        staging.rename(final)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return final
