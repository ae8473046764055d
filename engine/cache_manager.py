"""Which cache rows each sequence owns: one state slot (conv + SSM of every Mamba layer) and a list of
KV blocks. Plain free lists; blocks carry a reference count so forked samples and prefix-cache hits
share full blocks.

With prefix caching, the state pools hold num_slots + num_checkpoints rows in two free lists: slots
for running sequences and checkpoint rows for the prefix index. Rows are interchangeable, so a
finishing sequence's slot becomes a checkpoint without a copy, and a free checkpoint row joins the
slots instead. KV blocks whose content the index knows stay cached when their last reference goes,
and are evicted (LRU, leaves first) only when the allocator runs dry. Device copies (checkpoint ->
slot on a hit, slot -> checkpoint, partial blocks) are queued in `copies` and run in order before the
next forward, when no step is in flight."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.prefix_cache import Node, PrefixIndex
from engine.sequence import Sequence


class FreeList:
    def __init__(self, ids: range):
        self.capacity = len(ids)
        self._free = list(reversed(ids))  # pop() hands out the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def release(self, item: int) -> None:
        self._free.append(item)

    @property
    def usage(self) -> float:
        """Fraction in use; 0 for an empty pool (a pure-SSM model has no KV blocks)."""
        return 1.0 - self.num_free / self.capacity if self.capacity else 0.0


@dataclass
class PrefixHit:
    num_tokens: int = 0  # tokens whose state (and KV) come from the cache
    nodes: list[Node] = field(default_factory=list)  # full nodes whose KV blocks the sequence shares
    checkpoint: Node | None = None  # the node whose state row is copied into the sequence's slot
    branch_point: int = 0  # > num_tokens: end a prefill chunk here and checkpoint it (a shared prefix)
    looked_up: bool = False  # the cache was asked (it is on and the request may use it)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which served from the cache
    evicted_checkpoints: int = 0
    evicted_blocks: int = 0


@dataclass(frozen=True)
class Copy:
    kind: str  # "state" (rows of every Mamba layer's pools) or "block" (KV of every attention layer)
    src: int
    dst: int


class CacheManager:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int, num_checkpoints: int = 0,
                 prefix_key: int | None = None, prefix_block_size: int = 16):
        """prefix_key: the index root's key (model, dtype, adapter); None disables prefix caching.
        prefix_block_size: the index's granularity (the KV block size; pure SSMs have no KV blocks)."""
        self.slots = FreeList(range(num_slots))
        self.checkpoint_rows = FreeList(range(num_slots, num_slots + num_checkpoints))
        self.blocks = FreeList(range(num_blocks))
        self.block_size = block_size
        self.block_refs = [0] * num_blocks
        self.index = PrefixIndex(prefix_block_size, prefix_key, self.block_refs) if prefix_key is not None else None
        self.node_of_block: dict[int, Node] = {}
        self.copies: list[Copy] = []
        self.stats = PrefixCacheStats()

    # ---- slots and blocks ----------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return self.slots.num_free

    @property
    def num_free_blocks(self) -> int:
        """Free blocks plus cached ones no sequence references (all evictable)."""
        return self.blocks.num_free + (self.index.num_unreferenced_blocks if self.index else 0)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks seq needs so that its first num_tokens tokens have a place in the KV cache."""
        if self.block_size == 0:
            return 0
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def take_slot(self) -> int:
        return self.slots.allocate()

    def release_slot(self, slot: int) -> None:
        self.slots.release(slot)

    def take_block(self) -> int:
        if self.blocks.num_free == 0:
            self._free_evicted(*self.index.evict_leaf())
            self.stats.evicted_blocks += 1
        block = self.blocks.allocate()
        self.block_refs[block] = 1
        return block

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Appends blocks until seq's first num_tokens tokens fit (caller checked there are enough)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self.take_block())

    def share_blocks(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.block_refs[block] == 0:  # only cached blocks are shared from zero references
                self.index.block_referenced()
            self.block_refs[block] += 1

    def release(self, seq: Sequence, keep_state: bool = False) -> None:
        """Returns seq's slot and its references to blocks. keep_state: seq's state is exact at its
        num_computed_tokens (it finished or is preempted between steps), so the prefix cache keeps it."""
        if keep_state and self.index is not None and seq.state_slot is not None:
            self._cache_sequence(seq)
        if seq.state_slot is not None:
            self.release_slot(seq.state_slot)
            seq.state_slot = None
        self.release_blocks(seq.block_table)
        seq.block_table = []
        seq.prefix_node = None

    def release_blocks(self, blocks: list[int]) -> None:
        for block in blocks:
            self.block_refs[block] -= 1
            if self.block_refs[block] == 0:
                node = self.node_of_block.get(block)
                if node is not None:
                    self.index.block_unreferenced(node)  # stays cached until the allocator needs it
                else:
                    self.blocks.release(block)

    def take_copies(self) -> list[Copy]:
        copies, self.copies = self.copies, []
        return copies

    @property
    def slot_usage(self) -> float:
        return self.slots.usage

    @property
    def kv_usage(self) -> float:
        """Fraction of blocks in use (cached ones nobody references count as free); 0 without KV blocks."""
        return 1.0 - self.num_free_blocks / self.blocks.capacity if self.blocks.capacity else 0.0

    @property
    def checkpoint_usage(self) -> float:
        return self.checkpoint_rows.usage

    # ---- prefix cache --------------------------------------------------------------------------

    def lookup(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix of seq's tokens (strictly shorter, so one token is computed and
        sampled) with a state checkpoint and, for hybrids, all its KV blocks; and where to branch."""
        if self.index is None or seq.needs_prompt_logprobs:
            return PrefixHit()  # prompt logprobs need every prompt position computed
        tokens, limit = seq.token_ids, seq.num_tokens - 1
        path = self.index.match(tokens, self.index.root_for(seq.lora_id))
        eligible = [n for n in path if n.depth <= limit]
        best = next((n for n in reversed(eligible) if n.checkpoint is not None), None)
        tail = self.index.tail(eligible[-1], tokens, limit)
        if tail is not None and (best is None or tail.depth > best.depth):
            best = tail
        hit = PrefixHit(looked_up=True)
        if best is not None:
            full = best.parent if best.is_tail else best
            hit.num_tokens, hit.checkpoint = best.depth, best
            hit.nodes = eligible[1:eligible.index(full) + 1] if self.block_size else []
        ibs = self.index.block_size
        shared = min(path[-1].depth, limit // ibs * ibs)
        if self.checkpoint_rows.capacity and shared > hit.num_tokens:
            hit.branch_point = shared
        return hit

    def blocks_for_hit(self, seq: Sequence, hit: PrefixHit, num_tokens: int) -> int:
        """Free blocks admitting seq with hit and its first num_tokens tokens would use up."""
        if self.block_size == 0:
            return 0
        shared = [n.block for n in hit.nodes]
        newly_referenced = sum(1 for b in shared if self.block_refs[b] == 0)
        return max(0, -(-num_tokens // self.block_size) - len(shared)) + newly_referenced

    def acquire(self, seq: Sequence, hit: PrefixHit, num_tokens: int) -> None:
        """Gives seq (which holds its slot) the hit's blocks and state, and blocks for num_tokens tokens."""
        if hit.checkpoint is None:
            self.grow(seq, num_tokens)
            return
        shared = [n.block for n in hit.nodes]
        self.share_blocks(shared)
        seq.block_table = list(shared)
        seq.prefix_node = hit.nodes[-1] if hit.nodes else None
        self.index.touch(hit.nodes + [hit.checkpoint])
        self.copies.append(Copy("state", hit.checkpoint.checkpoint, seq.state_slot))
        seq.num_computed_tokens = hit.num_tokens
        self.grow(seq, num_tokens)
        if hit.checkpoint.is_tail and self.block_size:  # copy-on-write of the cached partial block
            self.copies.append(Copy("block", hit.checkpoint.block, seq.block_table[len(shared)]))

    def register_blocks(self, seq: Sequence) -> None:
        """Indexes seq's newly computed full KV blocks, so that requests arriving later share them."""
        if self.index is not None and self.block_size:
            self._path(seq, seq.num_computed_tokens // self.block_size)

    def checkpoint(self, seq: Sequence) -> None:
        """Copies seq's state (exact at num_computed_tokens, between steps) into a checkpoint row."""
        if self.index is None or self.checkpoint_rows.capacity == 0 or seq.num_computed_tokens == 0:
            return
        partial = self.block_size and seq.num_computed_tokens % self.block_size
        if self._has_checkpoint(seq) or (partial and self.num_free_blocks == 0):
            return
        self._make_checkpoint_room()
        row = self.checkpoint_rows.allocate()
        self.copies.append(Copy("state", seq.state_slot, row))
        tail_block = None
        if partial:
            tail_block = self.take_block()
            self.block_refs[tail_block] = 0  # owned by the index, no sequence
            self.copies.append(Copy("block", seq.block_table[seq.num_computed_tokens // self.block_size], tail_block))
        self._insert_checkpoint(seq, row, tail_block)

    def reset_prefix_cache(self) -> bool:
        """Evicts every cached block and checkpoint no running sequence uses; True if the index is empty."""
        if self.index is None:
            return True
        while self.index.num_checkpoints:
            self._free_evicted(*self.index.evict_checkpoint())
        while self.index.num_unreferenced_blocks:
            self._free_evicted(*self.index.evict_leaf())
        return not self.index.nodes

    def _cache_sequence(self, seq: Sequence) -> None:
        """Hands seq's slot (and its partly filled last block) to the index as a checkpoint, no copy."""
        p = seq.num_computed_tokens
        if self.checkpoint_rows.capacity == 0 or p == 0:
            self.register_blocks(seq)
            return
        if self._has_checkpoint(seq):
            return
        tail_block = None
        if self.block_size and p % self.block_size:
            i = p // self.block_size
            if self.block_refs[seq.block_table[i]] != 1:  # shared with another sequence: not ours to give
                self.register_blocks(seq)
                return
            tail_block = seq.block_table.pop(i)
            self.block_refs[tail_block] = 0
        self._make_checkpoint_room()
        self.slots.release(self.checkpoint_rows.allocate())  # the rows trade places
        row, seq.state_slot = seq.state_slot, None
        self._insert_checkpoint(seq, row, tail_block)

    def _has_checkpoint(self, seq: Sequence) -> bool:
        node = self._path(seq, seq.num_computed_tokens // self.index.block_size)
        tail = self._tail_tokens(seq)
        existing = node.tails.get(tail) if tail else node
        if existing is not None and existing.checkpoint is not None:
            self.index.touch([existing])
            return True
        return False

    def _insert_checkpoint(self, seq: Sequence, row: int, tail_block: int | None) -> None:
        node = self._path(seq, seq.num_computed_tokens // self.index.block_size)  # again: room-making may prune
        tail = self._tail_tokens(seq)
        if tail:
            node = self.index.add(node, tail, tail_block)
            if tail_block is not None:
                self.node_of_block[tail_block] = node
        self.index.set_checkpoint(node, row)

    def _tail_tokens(self, seq: Sequence) -> tuple[int, ...]:
        p, ibs = seq.num_computed_tokens, self.index.block_size
        return tuple(seq.token_ids[p - p % ibs:p])

    def _make_checkpoint_room(self) -> None:
        if self.checkpoint_rows.num_free == 0:
            self._free_evicted(*self.index.evict_checkpoint())
            self.stats.evicted_checkpoints += 1
        self.index.compact()

    def _free_evicted(self, block: int | None, row: int | None) -> None:
        if block is not None:
            del self.node_of_block[block]
            self.blocks.release(block)
        if row is not None:
            self.checkpoint_rows.release(row)

    def _path(self, seq: Sequence, num_blocks: int) -> Node:
        """The index node of seq's first num_blocks full blocks, adding what is missing: for hybrids with
        seq's own blocks (a block already cached under the same tokens replaces seq's copy), for pure SSMs
        as block-less path nodes."""
        node = seq.prefix_node
        if node is None or not node.attached or node.depth > num_blocks * self.index.block_size:
            node = self.index.root_for(seq.lora_id)
        ibs = self.index.block_size
        for i in range(node.depth // ibs, num_blocks):
            tokens = tuple(seq.token_ids[i * ibs:(i + 1) * ibs])
            child = self.index.child(node, tokens)
            if child is None:
                block = seq.block_table[i] if self.block_size else None
                child = self.index.add(node, tokens, block)
                if block is not None:
                    self.node_of_block[block] = child
            elif self.block_size and child.block != seq.block_table[i]:  # the same tokens computed twice
                own = seq.block_table[i]
                self.share_blocks([child.block])
                seq.block_table[i] = child.block
                self.release_blocks([own])
            node = child
        seq.prefix_node = node
        return node
