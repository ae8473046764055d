"""The one place a request is checked against the model's real limits, at admission (server and `LLM`).

`SamplingParams` has already checked types and fixed ranges; here come the numbers that depend on
the model and its caches. A failure is a `RequestError` naming the parameter, which the server
turns into a 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams, is_int


class RequestError(ValueError):
    """A request that can never run, with the name of the parameter at fault (None: the request as a whole)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int  # the model's (embedding rows), which may exceed the tokenizer's
    max_model_len: int
    max_num_seqs: int
    block_size: int  # 0: no KV cache (pure SSM)
    num_kv_blocks: int


def check_prompt(prompt_ids: list[int], limits: ModelLimits, param: str = "prompt") -> None:
    if not prompt_ids:
        raise RequestError(f"{param} is empty: it must encode to at least one token", param)
    vocab = limits.vocab_size
    bad = [t for t in prompt_ids if not is_int(t) or not 0 <= t < vocab]
    if bad:
        raise RequestError(f"{param} token ids must be integers in [0, {vocab}), got {bad[:5]}", param)


def check_request(prompt_ids: list[int], params: SamplingParams, limits: ModelLimits,
                  prompt_param: str = "prompt") -> None:
    """Raises RequestError if the request can never run; clamps top_k to the vocabulary (same output)."""
    check_prompt(prompt_ids, limits, prompt_param)
    vocab, limit = limits.vocab_size, limits.max_model_len
    if params.n > limits.max_num_seqs:  # its n samples run side by side
        raise RequestError(f"n={params.n} exceeds max_num_seqs {limits.max_num_seqs}", "n")
    n = len(prompt_ids)
    scoring_only = params.max_tokens == 0  # a prompt of max_model_len tokens can still be scored
    if n > limit or (n == limit and not scoring_only):
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, your prompt has {n} tokens, "
            "which leaves no room for a completion. Please shorten the prompt.", prompt_param)
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
    if n + max_tokens > limit:
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested {n + max_tokens} "
            f"tokens ({n} in the prompt, {max_tokens} for the completion). Please reduce the prompt or "
            "max_tokens.", "max_tokens")
    if limits.block_size:
        needed = -(-(n + max_tokens) // limits.block_size) + params.n - 1
        if needed > limits.num_kv_blocks:
            raise RequestError(f"the request needs {needed} KV blocks of {limits.block_size} tokens but the "
                               f"cache has only {limits.num_kv_blocks}", "max_tokens")
    for name, ids in (("logit_bias", list(params.logit_bias or {})), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{name} token ids must be in [0, {vocab}), got {bad[:5]}", name)
    params.top_k = min(params.top_k, vocab)  # keeping more than the vocabulary keeps everything
