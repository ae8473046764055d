"""What the engine hands back: per-step deltas (server streaming) and whole results (offline API)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One prompt token's score, as vLLM reports prompt logprobs."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]  # per prompt token: None for the first, then actual + top-k


@dataclass
class StepOutput:
    """New output of one sample (index) of one request after one engine step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None  # one dict per new token: top ids (+ the sampled one)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    request_finished: bool = False  # the last output of the whole request (all n samples done)
    queue_time: float | None = None  # seconds from arrival to first scheduling, on the request's first output
    prompt_logprobs: PromptLogprobs | None = None  # once per request, on sample 0's first output after prefill


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (vLLM's name)
