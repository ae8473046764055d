"""Per-request sampling and stopping parameters (vLLM's names), checked on construction.

Construction checks what needs no model: types (a bool is not an integer) and fixed ranges. What
depends on the model (vocabulary, context length, cache size) is checked once at admission, in
`engine.request_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.structured_output.params import StructuredOutputsParams

# Temperatures below this sample greedily (vLLM's rule): dividing logits by ~1e-45 overflows to inf/nan.
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
# Stop strings are searched in every new piece of text: their number and length bound each step's work.
MAX_STOP_STRINGS, MAX_STOP_STRING_LEN = 256, 1024


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len; 0 (with prompt_logprobs): score the prompt only
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy (exact argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # number of top logprobs per token (the sampled one is always included)
    prompt_logprobs: int | None = None  # number of top logprobs per prompt token (the actual one is always included)
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (compiled at admission)
    stop_strings: list[str] = field(init=False, repr=False)
    stop_token_set: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        check(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        check(self.max_tokens is None or (is_int(self.max_tokens) and (
            self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None))),
              "max_tokens", "must be an integer >= 1 (0 only with prompt_logprobs: score the prompt)")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        check(is_number(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        check(is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or an integer >= 1")
        check(is_number(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            check(is_number(getattr(self, name)) and -2.0 <= getattr(self, name) <= 2.0, name, "must be in [-2, 2]")
        check(is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
              "repetition_penalty", "must be in (0, 2]")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
              "logprobs", "must be an integer in [0, 20]")
        check(self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
              "prompt_logprobs", "must be an integer in [0, 20]")
        check(self.seed is None or (is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]),
              "seed", "must be an integer in [-2**63, 2**64)")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            check(isinstance(getattr(self, name), bool), name, "must be a boolean")
        if self.logit_bias is not None:
            for tok, bias in self.logit_bias.items():
                if not is_int(tok) or not is_number(bias) or not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias must map token ids to values in [-100, 100], got {tok!r}: {bias!r}")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs", "must be a StructuredOutputsParams")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        check(all(isinstance(s, str) and s for s in stops), "stop", "must be non-empty strings")
        check(len(stops) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_STRING_LEN for s in stops), "stop",
              f"must be at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_LEN} characters")
        self.stop_strings = stops
        self.stop_token_ids = list(self.stop_token_ids or [])
        check(all(is_int(t) for t in self.stop_token_ids), "stop_token_ids", "must be integers")
        self.stop_token_set = frozenset(self.stop_token_ids)  # checked after every token
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def sample_seed(self, index: int) -> int | None:
        """Sample `index`'s seed: seed + index, wrapped into the generator's range (seed may be 2**64 - 1)."""
        return None if self.seed is None else (self.seed + index) % 2**64
