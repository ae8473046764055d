"""Grammars compiled once per spec, matchers handed out per sequence, and the bitmask of a step.

The llguidance tokenizer is built once from the engine's tokenizer.json, with the model's vocabulary
size: ids past the tokenizer's own vocabulary (padding rows of the embedding) are never allowed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import llguidance.torch
import torch

from engine.structured_output.params import StructuredOutputsParams
from engine.tokenizer import Tokenizer

CACHE_SIZE = 256  # compiled grammars kept (a matcher in its start state each)


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Iterable[int], max_rows: int):
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.tokenizer = llguidance.LLTokenizer(tokenizer.hf_tokenizer.to_str(), n_vocab=self.vocab_size,
                                                eos_token=sorted(eos_token_ids))
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # compiling runs in worker threads, handing out on the engine's
        self._executor = llguidance.LLExecutor()
        self._bitmask = llguidance.torch.allocate_token_bitmask(max_rows, self.vocab_size)

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A new matcher in the grammar's start state. ValueError saying what is wrong with the grammar."""
        return self.start_state(params).deep_copy()

    def start_state(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The cached matcher in the grammar's start state, compiled on first use (never advance it:
        `compile` hands out copies). ValueError saying what is wrong with the grammar."""
        key = params.key
        with self._lock:
            start = self._compiled.get(key)
            if start is not None:
                self._compiled.move_to_end(key)
                return start
        # Outside the lock: llguidance releases the GIL while it compiles, other requests go on.
        matcher = llguidance.LLMatcher(self.tokenizer, params.to_grammar(), log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid structured output grammar: {matcher.get_error().strip()}")
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32: bit t % 32 of word t // 32 of row i is set iff token t is
        allowed next for matchers[i]. Filled in parallel (llguidance's thread pool, GIL released)."""
        bitmask = self._bitmask[: len(matchers)]
        llguidance.torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)],
                                                     bitmask)
        return bitmask
