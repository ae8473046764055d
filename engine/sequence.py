"""One generated sequence: its tokens, how many are already in the caches, and which cache rows it holds."""

from __future__ import annotations

import itertools
import time
from enum import Enum

import torch

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams
from kernels import PAD_SLOT

_ids = itertools.count()

# The newest token while it is still on the device (async scheduling, LLMEngine.step): the host counts it,
# the device fills it in as the next step's input, and the engine replaces it once it reaches the host.
PENDING_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None = None, num_samples: int = 1, lora_id: int | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose state and KV are in the caches
        self.status = SequenceStatus.WAITING
        self.state_slot: int | None = None
        self.block_table: list[int] = []
        self.admitted_order = -1  # larger = admitted later = preempted first
        self.arrival_time = time.monotonic()
        self.queue_time: float | None = None  # arrival to first admission
        self.reserved_slots: list[int] = []  # held for the samples this sequence forks into
        self.reserved_blocks: list[int] = []
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.checkpoint_at = 0  # a prefill chunk ends here for a prefix-cache checkpoint (0: none)
        self.prefix_node = None  # prefix-index node of this sequence's indexed full blocks (engine.prefix_cache)
        # A request with n > 1 starts as one sequence that forks after its prompt is prefilled.
        self.num_samples = num_samples
        self.generator = generator
        self.unemitted_text = ""  # detokenized output not yet reported (only this: outputs can be long)
        self.num_detokenized_tokens = 0  # output tokens whose text is in unemitted_text (stop_checker.add_text)
        self.num_emitted_tokens = 0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # One entry per prompt token scored so far (the first has no context: None), kept across preemption.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.prompt_logprobs_reported = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer = None  # set by the engine (engine.tokenizer.IncrementalDetokenizer)
        # llguidance.LLMatcher of a constrained sequence, set at admission; it has consumed every output
        # token, so a preempted sequence recomputes its caches and keeps its matcher as it is.
        self.grammar = None
        self.lora_id = lora_id  # the LoRA adapter's lora_int_id (None: the base model)
        self.lora_slot = PAD_SLOT  # its row in the adapter stacks while running (engine.lora.manager)

    def clone_for_sample(self, index: int) -> Sequence:
        """A running copy for sample `index` of the same request, before any output token."""
        child = Sequence(self.request_id, index, self.token_ids, self.params, lora_id=self.lora_id)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.prompt_logprobs = None  # scored once per request, by sample 0
        child.num_cached_tokens = self.num_cached_tokens
        child.prefix_node = self.prefix_node
        child.status = SequenceStatus.RUNNING
        if self.grammar is not None:  # each sample its own matcher, from the parent's (start) state
            child.grammar = self.grammar.deep_copy()
        return child

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions remain to be scored. Such a sequence must compute every prompt
        position itself: a prefix cache must not serve it (hook for the prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def prompt_positions_to_score(self, num_new_tokens: int) -> range:
        """Positions among this step's new tokens whose logits score a prompt token not scored yet
        (position p scores token p+1; after a preemption the recompute scores nothing twice)."""
        if not self.needs_prompt_logprobs:
            return range(0)
        start = max(self.num_computed_tokens, len(self.prompt_logprobs) - 1)
        return range(start, min(self.num_computed_tokens + num_new_tokens, self.num_prompt_tokens - 1))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
