"""The synchronous engine: requests in, one scheduled forward step at a time, per-sample deltas out."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import NoReturn

import torch

from engine.async_scheduling import AsyncScheduler, InFlightStep, drop_done_rows
from engine.cache_manager import CacheManager
from engine.config import EngineArgs, load_model_config
from engine.loader import resolve_model_path
from engine.lora import LoRAError, LoRARequest
from engine.lora.manager import LoRAManager
from engine.model_runner import ModelRunner, resolve_device
from engine.outputs import Logprob, StepOutput
from engine.prompt_logprobs import PromptScores
from engine.quantization import resolve_quantization
from engine.request_checks import ModelLimits, RequestError, check_request
from engine.sampler import sample, select_rows
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.stop_checker import add_text, check_stop
from engine.structured_output import GrammarCompiler
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine hit a fault that may have corrupted shared state; it must be restarted."""


class ForkPreparationError(Exception):
    """Preparing a request's samples failed before anything changed (the cause says why)."""


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
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which served from it
    prefix_cache_checkpoint_usage: float = 0.0  # fraction of the checkpoint pool in use
    prefix_cache_evicted_checkpoints: int = 0
    prefix_cache_evicted_blocks: int = 0


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        model_dir = resolve_model_path(args.model, args.revision)
        arch, cfg = load_model_config(model_dir)
        cfg = dataclasses.replace(cfg, quantization=resolve_quantization(cfg.quantization, args.quantization))
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
        # Each LoRA adapter's prefixes hang under a root of their own (PrefixIndex.root_for).
        prefix_key = hash(("falcon-serve", arch, str(model_dir), str(self.runner.dtype), str(self.runner.state_dtype)))
        self.cache = CacheManager(self.runner.num_slots, self.runner.num_blocks, self.runner.block_size,
                                  num_checkpoints=self.runner.num_checkpoints,
                                  prefix_key=prefix_key if args.enable_prefix_caching else None,
                                  prefix_block_size=args.kv_block_size)
        if self.runner.block_size and self.cache.blocks.capacity * self.runner.block_size < self.max_model_len:
            logger.warning("the KV cache holds %d tokens, less than max_model_len %d: longer requests are refused",
                           self.cache.blocks.capacity * self.runner.block_size, self.max_model_len)
        self.lora: LoRAManager | None = None
        if args.enable_lora:
            self.lora = LoRAManager(self.runner.lora_slices, args.max_loras, args.max_lora_rank,
                                    args.max_cpu_loras or args.max_loras, self.runner.model.lora_multiplier,
                                    getattr(self.runner.model, "LORA_INERT", None))
            for module in args.lora_modules or []:  # checked now: a bad adapter is a start-up error
                self.lora.add(LoRARequest(module.name, self.lora.next_id(), module.path, module.base_model_name))
        self.scheduler = Scheduler(self.cache, args.max_num_seqs, max_batched, self.lora)
        self.limits = ModelLimits(vocab_size=cfg.vocab_size, max_model_len=self.max_model_len,
                                  max_num_seqs=args.max_num_seqs, block_size=self.cache.block_size,
                                  num_kv_blocks=self.cache.blocks.capacity)
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size, self.eos_token_ids, args.max_num_seqs) \
            if self.tokenizer is not None else None
        self.sequences: dict[str, list[Sequence]] = {}
        # Sequences whose newest token is reported by the next step, while its forward pass runs (step()).
        self._deferred: list[Sequence] = []
        self.async_scheduler = AsyncScheduler(args, self.scheduler, self.eos_token_ids, self.max_model_len,
                                              prefix_caching=self.cache.index is not None)
        self._fault: str | None = None  # set by a fatal fault: see step()

    # ---- requests ----------------------------------------------------------------------------

    def prepare(self, prompt: str | list[int], params: SamplingParams, prompt_param: str = "prompt") -> list[int]:
        """The prompt's token ids, after checking the request against the model's limits (RequestError)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: give the prompt as token ids", prompt_param)
            prompt = self.tokenizer.encode(prompt)
        ids = list(prompt)
        check_request(ids, params, self.limits, prompt_param)
        if params.structured_outputs is not None:
            self.check_grammar(params)
        return ids

    def check_grammar(self, params: SamplingParams) -> None:
        """Compiles (and caches) params' grammar, so that a bad one is refused before it is queued."""
        self._with_grammars(lambda grammars: grammars.start_state(params.structured_outputs))

    def _new_matcher(self, params: SamplingParams):
        """A matcher of params' grammar in its start state, for one sequence."""
        return self._with_grammars(lambda grammars: grammars.compile(params.structured_outputs))

    def _with_grammars(self, use):
        """use(the grammar cache); an invalid grammar, or none possible, is a RequestError."""
        if self.grammars is None:
            raise RequestError("structured outputs need a tokenizer; this model is served without one",
                               "structured_outputs")
        try:
            return use(self.grammars)
        except ValueError as e:
            raise RequestError(str(e), "structured_outputs") from None

    def add_lora(self, request: LoRARequest) -> int:
        """Makes an adapter known (read and checked once; LoRAError); returns the id requests use."""
        if self.lora is None:
            raise LoRAError("LoRA adapters need the engine started with enable_lora (--enable-lora)")
        self.lora.add(request)
        return request.lora_int_id

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    lora_request: LoRARequest | None = None) -> list[int]:
        """Checks and queues a request; returns its prompt token ids. Raises RequestError if it can never run."""
        ids = self.prepare(prompt, params)
        lora_id = self.add_lora(lora_request) if lora_request is not None else None
        self.enqueue(request_id, ids, params, lora_id)
        return ids

    def enqueue(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                lora_id: int | None = None) -> None:
        """Queues a request that `prepare` has checked; lora_id: an adapter add_lora made known."""
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, 0, prompt_ids, params, self._generator(params, 0), num_samples=params.n,
                       lora_id=lora_id)
        seq.detokenizer = self._detokenizer(prompt_ids, params)
        if params.structured_outputs is not None:
            seq.grammar = self._new_matcher(params)
        self.sequences[request_id] = [seq]
        self.scheduler.add(seq)

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | NoText:
        if self.tokenizer is None:
            return NoText()
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.sample_seed(index))

    def abort(self, request_id: str) -> list[StepOutput]:
        outputs = self._complete_request(request_id)  # its tokens still on the device, as a step reports them
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
        # Requests, not sequences: the n samples of one request count once (vLLM's gauges).
        running = {s.request_id for s in list(self.scheduler.running)}
        prefix = self.cache.stats
        return EngineStats(len(running), self.scheduler.num_waiting_requests, self.cache.kv_usage,
                           self.cache.slot_usage, self.scheduler.num_preemptions, prefix.queries, prefix.hits,
                           self.cache.checkpoint_usage, prefix.evicted_checkpoints, prefix.evicted_blocks)

    def reset_prefix_cache(self) -> bool:
        """Drops every cached KV block and state checkpoint not in use; True if nothing cached is left."""
        return self.cache.reset_prefix_cache()

    # ---- stepping ----------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Schedules and runs one forward step.

        The device runs the forward pass while the host reports what the previous step left: a sequence
        that goes on without stop strings has its newest token detokenized and reported one step later
        (its first token, its last one and every token of a sequence with stop strings are reported at
        once). Outputs are the same, only that host work is off the device's critical path.

        Async scheduling (EngineArgs.async_scheduling, engine/async_scheduling.py) goes further for
        decode-only steps: their sampled tokens stay on the device (InFlightStep), the next step is
        scheduled and launched with them as its inputs, and only then does the host wait for them and
        report them (_complete), while that step runs. Only what the host could not know in advance is
        found a step late: a sequence that ended on an eos or stop token ran one more row, which the
        device turned into padding (SampledTokens), and which is dropped (drop_done_rows). A step falls
        back to the order above whenever scheduling it needs the tokens (AsyncScheduler.schedule_ahead);
        sampling always sees the host state it would see there.

        A fault while sampling or emitting one sequence fails that request alone. A fault in scheduling,
        forking or the forward pass may have left shared state (caches, queues) inconsistent: the engine
        is then dead and every later call raises EngineDeadError with the reason.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        in_flight = self.async_scheduler.take_in_flight()
        outputs: list[StepOutput] = []
        sched = None
        if in_flight is not None:
            try:
                sched = self.async_scheduler.schedule_ahead(in_flight)
            except Exception as e:
                self._die("engine step failed; the engine cannot continue", e)
            if sched is None:  # the next step depends on the tokens: wait for them
                failed: dict[str, Exception] = {}
                outputs += self._complete(in_flight, failed)
                outputs += self._fail_requests(failed)
                in_flight = None
        try:
            if sched is None:
                sched = self.scheduler.schedule()
            if sched:
                self.runner.apply_copies(self.cache.take_copies())  # prefix-cache hits and checkpoints, in order
                sampled = None if in_flight is None else self.async_scheduler.inputs(in_flight, sched)
                logits, prompt_scores = self.runner.execute(sched, sampled)  # returns before the device is done
        except Exception as e:
            self._die("engine step failed; the engine cannot continue", e)
        # Requests whose adapter failed to load at admission (the scheduler refused them) fail alone.
        failed = {seq.request_id: e for seq, e in self.scheduler.take_refused()}
        outputs += self._report_deferred(failed)
        if in_flight is not None:
            outputs += self._complete(in_flight, failed)  # while the device runs this step
            sched, logits = drop_done_rows(sched, logits, failed)
        if not sched:
            return self._mark_finished_requests(outputs + self._fail_requests(failed))
        try:
            samplers, rows, scored_only = self._advance(sched, prompt_scores, failed)
        except Exception as e:
            self._die("engine step failed; the engine cannot continue", e)
        logits = select_rows(logits, rows)
        if (self.async_scheduler.can_sample_ahead(sched, samplers, failed, one_rank=self.runner.workers is None)
                and self.async_scheduler.sample_ahead(logits, samplers, self._grammar_mask)):
            return self._mark_finished_requests(outputs + self._fail_requests(failed))
        tokens, logprobs = self._sample(logits, samplers, failed) if samplers else ([], [])
        # A scored-only sequence (max_tokens=0) finishes with its prompt, without a token.
        emitted = [(seq, None, None) for seq in scored_only] + list(zip(samplers, tokens, logprobs))
        outputs += self._emit(emitted, failed, defer=True)
        return self._mark_finished_requests(outputs + self._fail_requests(failed))

    def _emit(self, emitted: list[tuple[Sequence, int | None, dict[int, float] | None]],
              failed: dict[str, Exception], defer: bool) -> list[StepOutput]:
        """Appends each sequence's sampled token (None: it finishes without one) and checks its stops;
        returns the outputs due now (defer: a going-on sequence's is reported by the next step)."""
        outputs = []
        for seq, token, token_logprobs in emitted:
            if seq.request_id in failed:
                continue
            try:
                if token is None:
                    self._finish(seq, "length")
                else:
                    seq.token_ids.append(token)
                    if seq.logprobs is not None:
                        seq.logprobs.append(token_logprobs)
                    if seq.grammar is not None and not seq.grammar.consume_token(token):
                        raise RuntimeError(f"the grammar refused sampled token {token}: {seq.grammar.get_error()}")
                    reason = check_stop(seq, token, self.eos_token_ids, self.max_model_len)
                    if reason is None and seq.grammar is not None and seq.grammar.is_stopped():
                        reason = "stop"  # the grammar is complete and allows nothing more (not even ignore_eos)
                    if reason is not None:
                        self._finish(seq, reason)
                if not defer or seq.is_finished or seq.num_emitted_tokens == 0 or seq.params.stop_strings:
                    outputs.append(self._output(seq, flush=seq.is_finished))
                else:
                    self._deferred.append(seq)
            except Exception as e:  # noqa: BLE001 - this request's fault: fail it, serve the rest
                logger.exception("request %s failed while emitting its output", seq.request_id)
                failed[seq.request_id] = e
        return outputs

    # ---- what the previous step left: its tokens in flight, its deferred outputs ----------------

    def _complete(self, in_flight: InFlightStep, failed: dict[str, Exception], request_id: str | None = None,
                  defer: bool = False) -> list[StepOutput]:
        """Waits for the in-flight tokens (of request_id's rows only, if given) and appends them; returns
        their outputs (defer: as the step that sampled them would have, deferring going-on ones')."""
        try:
            result = in_flight.sampled.result()
        except Exception as e:
            self._die("waiting for the sampled tokens failed; the engine cannot continue", e)
        return self._emit(in_flight.take(result, request_id), failed, defer)

    def _complete_request(self, request_id: str) -> list[StepOutput]:
        """Appends request_id's in-flight tokens now (before an abort, which reports a deferred one)."""
        in_flight = self.async_scheduler.in_flight
        if in_flight is None or not in_flight.holds(request_id):
            return []
        failed: dict[str, Exception] = {}
        outputs = self._complete(in_flight, failed, request_id, defer=True)
        if in_flight.all_taken:
            self.async_scheduler.in_flight = None
        return outputs + self._fail_requests(failed)

    def _report_deferred(self, failed: dict[str, Exception]) -> list[StepOutput]:
        """The outputs the previous step deferred (of sequences still running), their text detokenized now."""
        deferred, self._deferred = self._deferred, []
        outputs = []
        for seq in deferred:
            if seq.is_finished:  # aborted or failed since: that already reported it
                continue
            try:
                outputs.append(self._output(seq, flush=False))
            except Exception as e:  # noqa: BLE001 - this request's fault: fail it, serve the rest
                logger.exception("request %s failed while emitting its output", seq.request_id)
                failed[seq.request_id] = e
        return outputs

    def _fail_requests(self, failed: dict[str, Exception]) -> list[StepOutput]:
        try:
            return self._fail(failed)
        except Exception as e:
            self._die("failing a request left the scheduler inconsistent", e)

    @property
    def dead_reason(self) -> str | None:
        """Why the engine cannot continue (a fatal fault, or a tensor-parallel worker gone), or None."""
        return self.runner.failure or self._fault

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (idempotent)."""
        self.runner.close()

    def _die(self, what: str, error: Exception) -> NoReturn:
        logger.exception(what)
        self._fault = f"{type(error).__name__}: {error}"
        raise EngineDeadError(self.dead_reason) from error

    def _advance(self, sched: ScheduledBatch, prompt_scores: dict[int, PromptScores], failed: dict[str, Exception]
                 ) -> tuple[list[Sequence], list[int], list[Sequence]]:
        """Counts the computed tokens, records prompt logprobs, forks prefilled n > 1 requests. Returns the
        sequences to sample, the logits row of each (forked samples share their parent's) and the sequences
        that finish without sampling (max_tokens=0); requests that fail land in `failed`."""
        samplers: list[Sequence] = []
        rows: list[int] = []
        scored_only: list[Sequence] = []
        row = -1
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            if i in prompt_scores:
                self._add_prompt_logprobs(seq, prompt_scores[i])
            sampling = sched.samples(i)
            seq.num_computed_tokens += n
            self._update_prefix_cache(seq, prompt_done=sampling and seq.num_output_tokens == 0)
            if not sampling:
                continue
            row += 1
            group = [seq]
            if seq.num_samples > 1:  # prompt done: fork the other samples, sharing this row's logits
                try:
                    group += self._fork(seq)
                except ForkPreparationError as e:
                    failed[seq.request_id] = e.__cause__
                    continue
            if seq.params.max_tokens == 0:
                scored_only += group
            else:
                samplers += group
                rows += [row] * len(group)
        return samplers, rows, scored_only

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], failed: dict[str, Exception]
                ) -> tuple[list[int], list[dict[int, float] | None]]:
        """One token per row. If the batch fails, each row is sampled alone and only the rows that still
        fail are failed (their requests land in `failed`)."""
        try:
            result = sample(logits, seqs, self.eos_token_ids, self._grammar_mask(seqs))
            return result.token_ids, result.logprobs
        except Exception:  # noqa: BLE001
            logger.exception("batched sampling failed; sampling its %d rows one by one", len(seqs))
        tokens: list[int] = []
        logprobs: list[dict[int, float] | None] = []
        for i, seq in enumerate(seqs):
            try:
                result = sample(logits[i:i + 1], [seq], self.eos_token_ids, self._grammar_mask([seq]))
                tokens.append(result.token_ids[0])
                logprobs.append(result.logprobs[0])
            except Exception as e:  # noqa: BLE001
                logger.exception("request %s failed while sampling", seq.request_id)
                failed[seq.request_id] = e
                tokens.append(-1)
                logprobs.append(None)
        return tokens, logprobs

    def _grammar_mask(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
        """The rows of constrained sequences and their packed bitmask. Filled on the CPU while the device
        still runs the forward pass: nothing since execute() has waited for it."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        return (rows, self.grammars.fill_bitmask([seqs[i].grammar for i in rows])) if rows else None

    def _fail(self, failed: dict[str, Exception]) -> list[StepOutput]:
        """Finishes every unfinished sequence of each failed request with finish_reason "error"."""
        outputs = []
        for request_id, error in failed.items():
            for seq in self.sequences.get(request_id, []):
                if seq.is_finished:
                    continue
                self.scheduler.finish(seq, "error")  # no detokenizer flush: it may be what failed
                outputs.append(StepOutput(
                    request_id=request_id, index=seq.index, new_token_ids=[], new_text="", new_logprobs=None,
                    finished=True, finish_reason="error", num_prompt_tokens=seq.num_prompt_tokens,
                    num_cached_tokens=seq.num_cached_tokens, error=f"{type(error).__name__}: {error}"))
        return outputs

    def _add_prompt_logprobs(self, seq: Sequence, scores: PromptScores) -> None:
        """Appends one {token id: Logprob} per scored position: the actual next token first, then the top-k.
        Token texts are left to the API layers (off the step loop)."""
        first = len(seq.prompt_logprobs)
        for j, (lp, rank) in enumerate(zip(scores.token_logprobs, scores.ranks)):
            entry = {seq.token_ids[first + j]: Logprob(lp, rank)}
            for r, (token, top_lp) in enumerate(zip(scores.top_ids[j], scores.top_logprobs[j]), start=1):
                entry.setdefault(token, Logprob(top_lp, r))
            seq.prompt_logprobs.append(entry)

    def _update_prefix_cache(self, seq: Sequence, prompt_done: bool) -> None:
        """After a step: index seq's new full blocks; checkpoint its state at a branch point or prompt end."""
        self.cache.register_blocks(seq)
        if seq.num_computed_tokens == seq.checkpoint_at or prompt_done:
            seq.checkpoint_at = 0
            self.cache.checkpoint(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if not isinstance(seq.stop_reason, str):  # a stop string already cut the text; keep it cut
            add_text(seq)
            seq.unemitted_text += seq.detokenizer.flush()
        self.scheduler.finish(seq, reason)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """All or nothing: what can fail for one request (its generators, detokenizers) is built before the
        scheduler's bookkeeping changes; a failure there raises ForkPreparationError with nothing changed."""
        try:
            extra = [(self._generator(parent.params, i), self._detokenizer(parent.token_ids, parent.params))
                     for i in range(1, parent.num_samples)]
        except Exception as e:
            raise ForkPreparationError from e
        children, block_copies = self.scheduler.fork(parent)
        for child, (generator, detokenizer) in zip(children, extra):
            self.runner.copy_state(parent.state_slot, child.state_slot)
            child.generator, child.detokenizer = generator, detokenizer
            self.sequences[parent.request_id].append(child)
        for src, dst in block_copies:
            self.runner.copy_block(src, dst)
        return children

    def _output(self, seq: Sequence, flush: bool) -> StepOutput:
        """The part of seq's output not yet reported. Text that could still turn into a stop string is
        held back until it cannot (or the sequence ends)."""
        add_text(seq)  # a deferred sequence's newest tokens (a stop string's cut text is complete: no-op)
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
            stop_reason=seq.stop_reason, num_cached_tokens=seq.num_cached_tokens,
        )
        if seq.index == 0 and seq.num_emitted_tokens == 0 and (new_tokens or seq.params.max_tokens == 0):
            out.queue_time = seq.queue_time  # on the request's first token, or its only output
        if seq.prompt_logprobs is not None and not seq.needs_prompt_logprobs and not seq.prompt_logprobs_reported:
            out.prompt_logprobs, seq.prompt_logprobs_reported = seq.prompt_logprobs, True
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
