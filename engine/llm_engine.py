"""The synchronous engine: requests in, one scheduled forward step at a time, per-sample deltas out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.cache_manager import CacheManager
from engine.config import EngineArgs, load_model_config
from engine.loader import resolve_model_path
from engine.model_runner import ModelRunner, resolve_device
from engine.outputs import StepOutput
from engine.sampler import sample
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.stop_checker import check_stop
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class NoText:
    """The detokenizer of a model served without a tokenizer."""

    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    state_slot_usage: float
    num_preemptions: int


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        model_dir = resolve_model_path(args.model, args.revision)
        arch, cfg = load_model_config(model_dir)
        self.model_config = cfg
        try:
            tokenizer_dir = resolve_model_path(args.tokenizer, args.revision) if args.tokenizer else model_dir
            self.tokenizer: Tokenizer | None = Tokenizer.from_pretrained(tokenizer_dir,
                                                                         chat_template=args.chat_template)
        except FileNotFoundError as e:  # weights alone still serve token-id prompts, as vLLM's skip_tokenizer_init
            logger.warning("%s: prompts must be token ids and outputs carry no text", e)
            self.tokenizer = None
        self.eos_token_ids = set(cfg.eos_token_ids) | (self.tokenizer.eos_token_ids if self.tokenizer else set())
        self.max_model_len = args.max_model_len or min(cfg.max_position_embeddings, 32768)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        on_gpu = resolve_device(args.device).type == "cuda"
        max_batched = args.max_num_batched_tokens or (8192 if on_gpu else 2048)
        self.runner = ModelRunner(args, model_dir, arch, cfg, self.max_model_len, max_batched)
        self.device = self.runner.device
        self.cache = CacheManager(self.runner.num_slots, self.runner.num_blocks, self.runner.block_size)
        if self.runner.block_size and self.cache.blocks.capacity * self.runner.block_size < self.max_model_len:
            logger.warning("the KV cache holds %d tokens, less than max_model_len %d: longer requests are refused",
                           self.cache.blocks.capacity * self.runner.block_size, self.max_model_len)
        self.scheduler = Scheduler(self.cache, args.max_num_seqs, max_batched)
        self.sequences: dict[str, list[Sequence]] = {}

    # ---- requests ----------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("this model has no tokenizer: give the prompt as token ids")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        return ids

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request that could never run, with the numbers."""
        n, limit = len(prompt_ids), self.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens; the request has {n} "
                             f"prompt tokens and asks for {max_tokens} more ({n + max_tokens} in total)")
        if max_tokens < 1:
            raise ValueError(f"the prompt has {n} tokens, which leaves no room to generate within "
                             f"max_model_len {limit}")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs {self.scheduler.max_num_seqs}")
        bs = self.cache.block_size
        if bs:
            needed = -(-(n + max_tokens) // bs) + params.n - 1
            if needed > self.cache.blocks.capacity:
                raise ValueError(f"the request needs {needed} KV blocks of {bs} tokens but the cache has only "
                                 f"{self.cache.blocks.capacity}")
        vocab = self.model_config.vocab_size
        bad = [t for t in (params.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {bad[:5]}")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Queues a request; returns its prompt token ids. Raises ValueError if it can never run."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.tokenize_prompt(prompt)
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, 0, prompt_ids, params, self._generator(params, 0), num_samples=params.n)
        seq.detokenizer = self._detokenizer(prompt_ids, params)
        self.sequences[request_id] = [seq]
        self.scheduler.add(seq)
        return prompt_ids

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | NoText:
        if self.tokenizer is None:
            return NoText()
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed + index)

    def abort(self, request_id: str) -> list[StepOutput]:
        outputs = []
        for seq in self.sequences.pop(request_id, []):
            if not seq.is_finished:
                self._finish(seq, "abort")
                outputs.append(self._output(seq, flush=True))
        if outputs:
            outputs[-1].request_finished = True
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.cache.kv_usage,
                           self.cache.slot_usage, self.scheduler.num_preemptions)

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Schedules and runs one forward step. A failing step fails the sequences in it, not the engine."""
        sched = self.scheduler.schedule()
        if not sched:
            return []
        try:
            return self._run(sched)
        except Exception as e:  # noqa: BLE001 - report to the requests in this step, keep serving the rest
            logger.exception("engine step failed; failing the requests of its %d sequences", len(sched.seqs))
            outputs = []
            for request_id in dict.fromkeys(s.request_id for s in sched.seqs):
                for seq in self.sequences.get(request_id, []):
                    if not seq.is_finished:
                        self._finish(seq, "error")
                        out = self._output(seq, flush=True)
                        out.error = f"{type(e).__name__}: {e}"
                        outputs.append(out)
            return self._mark_finished_requests(outputs)

    def _run(self, sched: ScheduledBatch) -> list[StepOutput]:
        logits = self.runner.execute(sched)
        samplers: list[Sequence] = []
        rows: list[int] = []  # logits row of each sampler: one per sampling sequence, in batch order
        row = -1
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            sampling = sched.samples(i)
            seq.num_computed_tokens += n
            if not sampling:
                continue
            row += 1
            samplers.append(seq)
            rows.append(row)
            if seq.num_samples > 1:  # prompt done: fork the other samples, sharing this row's logits
                for child in self._fork(seq):
                    samplers.append(child)
                    rows.append(row)
        if rows != list(range(logits.shape[0])):
            logits = logits[rows]
        result = sample(logits, samplers, self.eos_token_ids)
        outputs = []
        for seq, token, logprobs in zip(samplers, result.token_ids, result.logprobs):
            seq.token_ids.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(logprobs)
            reason = check_stop(seq, token, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(self._output(seq, flush=seq.is_finished))
        return self._mark_finished_requests(outputs)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if not isinstance(seq.stop_reason, str):  # a stop string already cut the text; keep it cut
            seq.unemitted_text += seq.detokenizer.flush()
        self.scheduler.finish(seq, reason)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        children, block_copies = self.scheduler.fork(parent)
        for child in children:
            self.runner.copy_state(parent.state_slot, child.state_slot)
            child.generator = self._generator(child.params, child.index)
            child.detokenizer = self._detokenizer(parent.token_ids, child.params)
            self.sequences[parent.request_id].append(child)
        for src, dst in block_copies:
            self.runner.copy_block(src, dst)
        return children

    def _output(self, seq: Sequence, flush: bool) -> StepOutput:
        """The part of seq's output not yet reported. Text that could still turn into a stop string is
        held back until it cannot (or the sequence ends)."""
        text = seq.unemitted_text
        if not flush and seq.params.stop_strings:
            text = text[: max(0, len(text) - max(map(len, seq.params.stop_strings)) + 1)]
        seq.unemitted_text = seq.unemitted_text[len(text):]
        new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens:]
        out = StepOutput(
            request_id=seq.request_id, index=seq.index, new_token_ids=new_tokens,
            new_text=text,
            new_logprobs=seq.logprobs[seq.num_emitted_tokens:] if seq.logprobs is not None else None,
            finished=seq.is_finished, finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
            stop_reason=seq.stop_reason,
        )
        if seq.index == 0 and seq.num_emitted_tokens == 0 and new_tokens:  # the request's first token
            out.queue_time = seq.queue_time
        seq.num_emitted_tokens = seq.num_output_tokens
        return out

    def _mark_finished_requests(self, outputs: list[StepOutput]) -> list[StepOutput]:
        """Flags the last output of each request whose sequences have all finished, and forgets it."""
        for out in reversed(outputs):
            seqs = self.sequences.get(out.request_id)
            if seqs and all(s.is_finished for s in seqs):
                out.request_finished = True
                del self.sequences[out.request_id]
        return outputs
