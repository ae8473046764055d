"""The prefix index: a tree of token blocks addressed by a hash chain, key = hash(parent key, block tokens),
the root's key naming the model, dtype and adapter. A node may own the KV block holding its tokens and a
state checkpoint (a row of the state pools: every Mamba layer's SSM + conv state after exactly `depth`
tokens). Full nodes hold block_size tokens; a tail node holds fewer (a sequence ended mid-block), owns a
checkpoint and a copy-on-write KV block, and is always a leaf.

Eviction is LRU with leaves first: a node leaves the tree only when it has no children and no running
sequence references its block, so every cached node's prefix is cached too."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    key: int
    parent: Node | None
    tokens: tuple[int, ...]
    depth: int  # tokens from the root to the end of this node
    block: int | None = None  # KV block with these tokens' K/V (None: pure SSM model, or the root)
    checkpoint: int | None = None  # state row holding the state after exactly `depth` tokens
    num_children: int = 0
    last_used: int = 0
    is_tail: bool = False
    attached: bool = True  # False once evicted: a sequence holding this node must walk the chain again
    tails: dict[tuple[int, ...], Node] = field(default_factory=dict)  # tail children by their tokens


def chain_key(parent_key: int, tokens: tuple[int, ...]) -> int:
    return hash((parent_key, tokens))


class PrefixIndex:
    def __init__(self, block_size: int, root_key: int, block_refs: list[int]):
        self.block_size = block_size
        self.root = Node(root_key, None, (), 0)  # the base model's; each adapter has its own (root_for)
        self._roots: dict[int | None, Node] = {None: self.root}
        self.block_refs = block_refs  # the allocator's reference counts (running sequences only)
        self.nodes: dict[int, Node] = {}
        self.num_checkpoints = 0
        self.num_unreferenced_blocks = 0  # cached blocks no running sequence uses: all evictable
        self._clock = itertools.count(1)
        self._order = itertools.count()
        self._leaves: list[tuple[int, int, int, Node]] = []  # (last_used, -depth, n, node), lazily pruned
        self._checkpoints: list[tuple[int, int, int, Node]] = []

    # ---- lookup ---------------------------------------------------------------------------------

    def root_for(self, adapter: int | None) -> Node:
        """The root under which sequences of LoRA adapter `adapter` (None: the base model) cache prefixes:
        the same tokens give other states under another adapter."""
        root = self._roots.get(adapter)
        if root is None:
            root = self._roots[adapter] = Node(hash((self.root.key, "lora", adapter)), None, (), 0)
        return root

    def child(self, parent: Node, tokens: tuple[int, ...]) -> Node | None:
        node = self.nodes.get(chain_key(parent.key, tokens))
        if node is None or node.parent is not parent or node.tokens != tokens:  # a hash collision is a miss
            return None
        return node

    def match(self, token_ids: list[int], root: Node | None = None) -> list[Node]:
        """The chain of full nodes along token_ids, from the root (included) down as far as it is cached."""
        path, bs = [root or self.root], self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            node = self.child(path[-1], tuple(token_ids[start:start + bs]))
            if node is None:
                break
            path.append(node)
        return path

    def tail(self, parent: Node, token_ids: list[int], limit: int) -> Node | None:
        """The longest tail checkpoint under parent that token_ids continue with, ending at most at limit."""
        best = None
        for tokens, node in parent.tails.items():
            end = parent.depth + len(tokens)
            if end <= limit and tuple(token_ids[parent.depth:end]) == tokens and (best is None or end > best.depth):
                best = node
        return best

    def touch(self, nodes: list[Node]) -> None:
        now = next(self._clock)
        for node in nodes:
            if node.parent is None:  # a root
                continue
            node.last_used = now
            self._push_candidate(node)
            if node.checkpoint is not None:
                heapq.heappush(self._checkpoints, (now, -node.depth, next(self._order), node))

    # ---- insertion ------------------------------------------------------------------------------

    def add(self, parent: Node, tokens: tuple[int, ...], block: int | None) -> Node:
        """A new full or tail node under parent (the caller checked it is not there yet)."""
        node = Node(chain_key(parent.key, tokens), parent, tokens, parent.depth + len(tokens), block,
                    is_tail=len(tokens) < self.block_size)
        self.nodes[node.key] = node
        if node.is_tail:
            parent.tails[tokens] = node
        parent.num_children += 1
        if block is not None and self.block_refs[block] == 0:
            self.num_unreferenced_blocks += 1
        self.touch([node])
        return node

    def set_checkpoint(self, node: Node, row: int) -> None:
        node.checkpoint = row
        self.num_checkpoints += 1
        self.touch([node])

    # ---- reference counts of cached blocks ------------------------------------------------------

    def block_referenced(self) -> None:
        """A running sequence took a cached block from zero references to one."""
        self.num_unreferenced_blocks -= 1

    def block_unreferenced(self, node: Node) -> None:
        """The last running sequence let go of node's block: it stays cached, most recently used."""
        self.num_unreferenced_blocks += 1
        self.touch([node])

    # ---- eviction -------------------------------------------------------------------------------

    def _evictable(self, node: Node) -> bool:
        return (node.attached and node.num_children == 0
                and (node.block is None or self.block_refs[node.block] == 0))

    def _push_candidate(self, node: Node) -> None:
        if self._evictable(node):
            heapq.heappush(self._leaves, (node.last_used, -node.depth, next(self._order), node))

    def evict_leaf(self) -> tuple[int | None, int | None]:
        """Removes the least recently used evictable leaf; returns its (block, checkpoint row) to free.
        The caller made sure there is one (num_unreferenced_blocks > 0, or checkpoints without blocks)."""
        while True:
            last_used, _, _, node = heapq.heappop(self._leaves)
            if node.last_used == last_used and self._evictable(node):
                return self._remove(node)

    def evict_checkpoint(self) -> tuple[int | None, int]:
        """Drops the least recently used checkpoint; returns (block, row) to free. A tail node goes with its
        checkpoint (its block as well); a block-less node (pure SSM) that is left empty is pruned."""
        while True:
            last_used, _, _, node = heapq.heappop(self._checkpoints)
            if node.attached and node.checkpoint is not None and node.last_used == last_used:
                break
        if node.is_tail or (node.block is None and node.num_children == 0):
            return self._remove(node)
        row, node.checkpoint = node.checkpoint, None
        self.num_checkpoints -= 1
        return None, row

    def _remove(self, node: Node) -> tuple[int | None, int | None]:
        parent = node.parent
        del self.nodes[node.key]
        node.attached = False
        if node.is_tail:
            del parent.tails[node.tokens]
        parent.num_children -= 1
        if node.block is not None:
            self.num_unreferenced_blocks -= 1
        if node.checkpoint is not None:
            self.num_checkpoints -= 1
        # A block-less parent without children or checkpoint carries nothing: prune it too (pure SSMs).
        if (parent.parent is not None and parent.num_children == 0 and parent.block is None
                and parent.checkpoint is None):
            self._remove(parent)
        elif parent.parent is not None:
            self._push_candidate(parent)
        return node.block, node.checkpoint

    def compact(self) -> None:
        """Drops stale heap entries once they far outnumber the nodes (they are skipped lazily otherwise)."""
        if len(self._leaves) + len(self._checkpoints) > 4 * len(self.nodes) + 1024:
            self._leaves = [e for e in self._leaves if e[3].last_used == e[0] and self._evictable(e[3])]
            self._checkpoints = [e for e in self._checkpoints
                                 if e[3].attached and e[3].checkpoint is not None and e[3].last_used == e[0]]
            heapq.heapify(self._leaves)
            heapq.heapify(self._checkpoints)
