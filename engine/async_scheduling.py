"""Async scheduling (EngineArgs.async_scheduling): decode step N+1 is scheduled and launched while step N's
sampled tokens are still on the device (the step in flight); the host waits for them only after that
launch (LLMEngine.step).

AsyncScheduler decides when a step may run ahead of its inputs' tokens: only where the host could schedule
it the same without them. What the tokens alone tell (an eos or stop token) is found a step late: the
device turns that sequence's extra row into padding (engine/sampled_tokens.py) and the host drops it
(drop_done_rows)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.config import EngineArgs
from engine.sampled_tokens import SampledTokens
from engine.sampler import DeviceSample, SampleResult, sample_on_device, select_rows
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import PENDING_TOKEN, Sequence

logger = logging.getLogger(__name__)


class InFlightStep:
    """A decode step whose sampled tokens are still on the device: each row's sequence ends with a
    PENDING_TOKEN placeholder until `take` hands out the real token."""

    def __init__(self, seqs: list[Sequence], sampled: DeviceSample):
        self.seqs: list[Sequence | None] = list(seqs)  # None: taken early (an abort)
        self.sampled = sampled
        self.row_of = {seq: row for row, seq in enumerate(seqs)}

    def holds(self, request_id: str) -> bool:
        return any(seq is not None and seq.request_id == request_id for seq in self.seqs)

    @property
    def all_taken(self) -> bool:
        return all(seq is None for seq in self.seqs)

    def take(self, result: SampleResult, request_id: str | None = None
             ) -> list[tuple[Sequence, int, dict[int, float] | None]]:
        """Each row's (sequence, token, logprobs) from `result` (this step's sampled tokens on the host), of
        request_id's rows only if given, its placeholder removed; the rows are not handed out again."""
        taken = []
        for row, seq in enumerate(self.seqs):
            if seq is None or (request_id is not None and seq.request_id != request_id):
                continue
            seq.token_ids.pop()  # its PENDING_TOKEN
            self.seqs[row] = None
            taken.append((seq, result.token_ids[row], result.logprobs[row]))
        return taken


class AsyncScheduler:
    """The step in flight, and the rules for when a step may be scheduled, or its tokens left, ahead of the host."""

    def __init__(self, args: EngineArgs, scheduler: Scheduler, eos_token_ids: set[int], max_model_len: int,
                 prefix_caching: bool):
        self.args = args  # read at each step: async_scheduling may be switched between steps (a benchmark does)
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.prefix_caching = prefix_caching
        self.in_flight: InFlightStep | None = None  # the decode step sampled last

    def take_in_flight(self) -> InFlightStep | None:
        in_flight, self.in_flight = self.in_flight, None
        return in_flight

    def schedule_ahead(self, in_flight: InFlightStep) -> ScheduledBatch | None:
        """The next decode step of the in-flight sequences, before their tokens are known, if it is the
        step schedule() would run once they are (minus the sequences that end with them): nobody
        waits for admission, every running sequence is in flight, blocks need no preemption or
        eviction. A sequence whose pending token is its last by length is left out (known in advance:
        max_tokens is never overshot). None: the tokens are needed first."""
        seqs = [seq for seq in in_flight.seqs if seq is not None and not seq.is_finished]
        if (not self.args.async_scheduling or self.scheduler.waiting or len(seqs) != len(self.scheduler.running)
                or not all(map(self._overlappable, seqs))):
            return None
        going_on = [seq for seq in seqs if not self._ends_by_length(seq)]
        return self.scheduler.schedule_decodes(going_on) if going_on else None

    def inputs(self, in_flight: InFlightStep, sched: ScheduledBatch) -> SampledTokens:
        """The input tokens of a step scheduled ahead: each row's from the in-flight samples, with the
        tokens that would end it there."""
        return SampledTokens(in_flight.sampled.token_ids, [in_flight.row_of[seq] for seq in sched.seqs],
                             [self._stop_ids(seq) for seq in sched.seqs])

    def can_sample_ahead(self, sched: ScheduledBatch, samplers: list[Sequence], failed: dict[str, Exception],
                         one_rank: bool) -> bool:
        """Whether this step's tokens may stay on the device: a decode-only step the next one could be
        scheduled ahead of (schedule_ahead), on one rank (workers would need the tokens on the host)."""
        return (self.args.async_scheduling and one_rank and not failed
                and sched.num_decodes == len(sched.seqs) == len(samplers) and not self.scheduler.waiting
                and all(map(self._overlappable, samplers)))

    def sample_ahead(self, logits: torch.Tensor, samplers: list[Sequence],
                     grammar_mask: Callable[[list[Sequence]], tuple[list[int], torch.Tensor] | None]) -> bool:
        """Samples on the device and leaves the tokens there (the step in flight); False if sampling
        failed (the caller samples the rows one by one, waiting). grammar_mask: LLMEngine._grammar_mask."""
        try:
            sampled = sample_on_device(logits, samplers, self.eos_token_ids, grammar_mask(samplers))
        except Exception:  # noqa: BLE001
            logger.exception("batched sampling failed; sampling its %d rows one by one", len(samplers))
            return False
        for seq in samplers:
            seq.token_ids.append(PENDING_TOKEN)
        self.in_flight = InFlightStep(samplers, sampled)
        return True

    def _ends_by_length(self, seq: Sequence) -> bool:
        """check_stop's length rule, for a sequence whose newest (counted) token is pending."""
        max_tokens = seq.params.max_tokens if seq.params.max_tokens is not None else self.max_model_len
        return seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len

    def _stop_ids(self, seq: Sequence) -> list[int]:
        """The tokens that would end seq as its pending token (check_stop's eos and stop token rules)."""
        params = seq.params
        if seq.num_output_tokens < params.min_tokens:
            return []
        return sorted(params.stop_token_set if params.ignore_eos else params.stop_token_set | self.eos_token_ids)

    def _overlappable(self, seq: Sequence) -> bool:
        """Whether seq's next step may run before its newest token is on the host. A stop string or a
        grammar can end it where the device cannot tell; its extra row then writes its state, which
        the prefix cache must not keep as a checkpoint."""
        return not self.prefix_caching or not (seq.params.stop_strings or seq.grammar is not None)


def drop_done_rows(sched: ScheduledBatch, logits: torch.Tensor, failed: dict[str, Exception]
                   ) -> tuple[ScheduledBatch, torch.Tensor]:
    """A step scheduled ahead without the rows of sequences that its inputs ended (or that failed), and
    their logits."""
    keep = [i for i, seq in enumerate(sched.seqs) if not seq.is_finished and seq.request_id not in failed]
    if len(keep) == len(sched.seqs):
        return sched, logits
    seqs = [sched.seqs[i] for i in keep]
    return ScheduledBatch(seqs, [1] * len(seqs), len(seqs)), select_rows(logits, keep)
