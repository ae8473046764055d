"""Iteration-level scheduling: which sequences run in the next forward step, and how many of their
tokens. Decodes first, then prefill chunks of running sequences, then newly admitted ones, within
`max_num_batched_tokens` and `max_num_seqs`. When KV blocks run out the most recently admitted
sequence is preempted (its slot and blocks freed, requeued to recompute) so the others finish.

With prefix caching, admission starts a sequence at its longest cached prefix (CacheManager.lookup),
a prefill chunk ends where a prompt branches off a cached prefix (so a checkpoint is taken there), and
finished or preempted sequences leave their state to the cache instead of dropping it."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from engine.cache_manager import CacheManager, PrefixHit
from engine.lora import LoRAError
from engine.lora.manager import LoRAManager
from engine.sequence import Sequence, SequenceStatus
from kernels import PAD_SLOT


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence, this step
    num_decodes: int = 0  # seqs[:num_decodes] are decodes (one token each)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step, so it needs a sampled token."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lora: LoRAManager | None = None):
        self.cache = cache
        self.lora = lora  # a sequence with an adapter is admitted once a device slot holds it
        self.refused: list[tuple[Sequence, Exception]] = []  # whose adapter failed to load at admission
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._admissions = itertools.count()
        # Kept as counts (not computed from `waiting`) so that other threads can read them mid-step.
        self.num_waiting_requests = 0
        self.num_waiting_samples = 0  # what the server's queue limit counts: a request with n samples is n

    def add(self, seq: Sequence) -> None:
        self._enter_waiting(seq)
        self.waiting.append(seq)

    def _enter_waiting(self, seq: Sequence) -> None:
        self.num_waiting_requests += 1
        self.num_waiting_samples += seq.num_samples

    def _leave_waiting(self, seq: Sequence) -> None:
        self.num_waiting_requests -= 1
        self.num_waiting_samples -= seq.num_samples

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []
        # Running sequences in admission order, so preemption (newest first) never hits one already placed.
        for seq in sorted(self.running, key=lambda s: s.admitted_order):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            if not self._reserve_blocks(seq, seq.num_computed_tokens + n):
                continue  # seq itself was preempted
            budget -= n
            if seq.is_decode:
                decodes.append(seq)
            else:
                prefills.append((seq, n))
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        # After a preemption, admitting more would only take the blocks back from whoever needs them next.
        admit = self.num_preemptions == preemptions_before
        waiting_for_adapter: list[Sequence] = []  # later requests may go first: they need no busy slot
        while admit and self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.lora_id is not None and not self.lora.can_acquire(seq.lora_id):
                waiting_for_adapter.append(self.waiting.popleft())
                continue
            if not self._can_admit(seq):
                break
            hit = self.cache.lookup(seq)
            seq.checkpoint_at = hit.branch_point
            n = self._chunk(seq, hit.num_tokens, budget)
            if (self.cache.blocks_for_hit(seq, hit, hit.num_tokens + n) + self._fork_blocks(seq)
                    > self.cache.num_free_blocks):
                break
            self.waiting.popleft()
            self._leave_waiting(seq)
            if not self._admit(seq, hit, n):
                continue
            budget -= n
            prefills.append((seq, n))
        self.waiting.extendleft(reversed(waiting_for_adapter))
        return ScheduledBatch(seqs=decodes + [s for s, _ in prefills],
                              num_new_tokens=[1] * len(decodes) + [n for _, n in prefills],
                              num_decodes=len(decodes))

    def schedule_decodes(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """A decode step of seqs (running, one token each to compute) that takes only free KV blocks, so
        that nothing is preempted or evicted: what schedule() would run for them. None if it cannot."""
        needed = sum(self.cache.blocks_needed(seq, seq.num_tokens) for seq in seqs)
        if needed > self.cache.blocks.num_free or len(seqs) > self.max_num_batched_tokens:
            return None
        for seq in seqs:
            self.cache.grow(seq, seq.num_tokens)
        return ScheduledBatch(seqs=list(seqs), num_new_tokens=[1] * len(seqs), num_decodes=len(seqs))

    @staticmethod
    def _chunk(seq: Sequence, start: int, budget: int) -> int:
        """Tokens of seq to compute from start this step: within budget, and ending at a branch point."""
        n = min(seq.num_tokens - start, budget)
        if seq.checkpoint_at > start:
            n = min(n, seq.checkpoint_at - start)
        return n

    def _can_admit(self, seq: Sequence) -> bool:
        # A request with n samples holds n slots from the start, so forking it never waits.
        return (len(self.running) + seq.num_samples <= self.max_num_seqs
                and self.cache.num_free_slots >= seq.num_samples)

    def _fork_blocks(self, seq: Sequence) -> int:
        # Each extra sample gets its own copy of the last, partly filled prompt block.
        return seq.num_samples - 1 if self.cache.block_size else 0

    def take_refused(self) -> list[tuple[Sequence, Exception]]:
        refused, self.refused = self.refused, []
        return refused

    def _admit(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int) -> bool:
        """False if seq's adapter no longer loads: seq is then in `refused`, holding nothing."""
        if seq.lora_id is not None:
            try:
                seq.lora_slot = self.lora.acquire(seq.lora_id)
            except LoRAError as e:
                self.refused.append((seq, e))
                return False
        seq.state_slot = self.cache.take_slot()
        # The hit's blocks are referenced before any block is taken, so taking one cannot evict them.
        self.cache.acquire(seq, hit, hit.num_tokens + num_new_tokens)
        seq.reserved_slots = [self.cache.take_slot() for _ in range(seq.num_samples - 1)]
        seq.reserved_blocks = [self.cache.take_block() for _ in range(self._fork_blocks(seq))]
        seq.status = SequenceStatus.RUNNING
        seq.admitted_order = next(self._admissions)
        if seq.queue_time is None:  # first admission: what the request's usage and the metrics report
            seq.queue_time = time.monotonic() - seq.arrival_time
            seq.num_cached_tokens = hit.num_tokens
            if hit.looked_up:
                self.cache.stats.queries += seq.num_tokens
                self.cache.stats.hits += hit.num_tokens
        self.running.append(seq)
        return True

    def _reserve_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes room for seq's first num_tokens tokens, preempting newer sequences; False if seq itself went."""
        while self.cache.blocks_needed(seq, num_tokens) > self.cache.num_free_blocks:
            victim = max((s for s in self.running if s.status is SequenceStatus.RUNNING),
                         key=lambda s: s.admitted_order)
            self.preempt(victim)
            if victim is seq:
                return False
        self.cache.grow(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Frees everything seq holds (its state goes to the prefix cache) and puts it first in line to be
        recomputed from its tokens."""
        self._release(seq, keep_state=True)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._enter_waiting(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def fork(self, parent: Sequence) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Splits a prefilled request with n samples into n sequences. Children take the reserved slots
        and share the parent's full KV blocks; a last, partly filled block (which each sample will write
        on) is replaced by a reserved block. Returns the children and the (src, dst) blocks to copy; the
        caller copies state rows and block contents."""
        children, block_copies = [], []
        partial = parent.num_computed_tokens % self.cache.block_size if self.cache.block_size else 0
        for index, slot in enumerate(parent.reserved_slots, start=1):
            child = parent.clone_for_sample(index)
            child.state_slot = slot
            child.admitted_order = next(self._admissions)
            if child.lora_id is not None:  # resident (the parent holds it): never waits
                child.lora_slot = self.lora.acquire(child.lora_id)
            shared = parent.block_table[:-1] if partial else parent.block_table
            self.cache.share_blocks(shared)
            child.block_table = list(shared)
            if partial:
                own = parent.reserved_blocks.pop()
                child.block_table.append(own)
                block_copies.append((parent.block_table[-1], own))
            children.append(child)
        self.cache.release_blocks(parent.reserved_blocks)
        parent.reserved_slots, parent.reserved_blocks = [], []
        parent.num_samples = 1
        self.running.extend(children)
        return children, block_copies

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq, keep_state=reason != "error")  # a failed step may have half-written the state
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self._leave_waiting(seq)

    def _release(self, seq: Sequence, keep_state: bool = False) -> None:
        for slot in seq.reserved_slots:
            self.cache.release_slot(slot)
        self.cache.release_blocks(seq.reserved_blocks)
        seq.reserved_slots, seq.reserved_blocks = [], []
        seq.checkpoint_at = 0
        if seq.lora_slot != PAD_SLOT:
            self.lora.release(seq.lora_slot)
            seq.lora_slot = PAD_SLOT
        self.cache.release(seq, keep_state)
