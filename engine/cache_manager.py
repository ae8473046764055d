"""Which cache rows each sequence owns: one state slot (conv + SSM of every Mamba layer) and a list of
KV blocks. Plain free lists; blocks carry a reference count so forked samples share full prompt blocks."""

from __future__ import annotations

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


class CacheManager:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int):
        self.slots = FreeList(range(num_slots))
        self.blocks = FreeList(range(num_blocks))
        self.block_size = block_size
        self.block_refs = [0] * num_blocks

    @property
    def num_free_slots(self) -> int:
        return self.slots.num_free

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks seq needs so that its first num_tokens tokens have a place in the KV cache."""
        if self.block_size == 0:
            return 0
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def take_slot(self) -> int:
        return self.slots.allocate()

    def take_block(self) -> int:
        block = self.blocks.allocate()
        self.block_refs[block] = 1
        return block

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Appends blocks until seq's first num_tokens tokens fit (caller checked there are enough)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self.take_block())

    def share_blocks(self, blocks: list[int]) -> None:
        for block in blocks:
            self.block_refs[block] += 1

    def release(self, seq: Sequence) -> None:
        """Returns seq's slot and its references to blocks."""
        if seq.state_slot is not None:
            self.slots.release(seq.state_slot)
            seq.state_slot = None
        self.release_blocks(seq.block_table)
        seq.block_table = []

    def release_blocks(self, blocks: list[int]) -> None:
        for block in blocks:
            self.block_refs[block] -= 1
            if self.block_refs[block] == 0:
                self.blocks.release(block)

    @property
    def slot_usage(self) -> float:
        return self.slots.usage

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage
