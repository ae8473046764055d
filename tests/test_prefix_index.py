"""The prefix cache's bookkeeping without a model: hits, LRU eviction leaves first, checkpoint pool
limits, and that every block and row comes back."""

from engine.cache_manager import CacheManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def cache(num_blocks=6, num_checkpoints=2) -> CacheManager:
    return CacheManager(num_slots=2, num_blocks=num_blocks, block_size=2, num_checkpoints=num_checkpoints,
                        prefix_key=0, prefix_block_size=2)


def finish(cm: CacheManager, tokens: list[int], computed: int | None = None) -> Sequence:
    """A sequence that ran to `computed` tokens (all but the last) and ended: its state goes to the cache."""
    seq = Sequence("r", 0, tokens, SamplingParams())
    hit = cm.lookup(seq)
    seq.state_slot = cm.take_slot()
    cm.acquire(seq, hit, len(tokens))
    seq.num_computed_tokens = len(tokens) - 1 if computed is None else computed
    cm.register_blocks(seq)
    cm.release(seq, keep_state=True)
    return seq


def test_a_finished_sequence_becomes_a_hit_and_eviction_takes_the_oldest_leaf_first():
    cm = cache()
    finish(cm, [1, 2, 3, 4, 5])  # state after 4 tokens, at a block boundary; blocks [1,2] [3,4] cached
    assert cm.num_free_blocks == 6 and cm.blocks.num_free == 4 and cm.index.num_checkpoints == 1
    hit = cm.lookup(Sequence("q", 0, [1, 2, 3, 4, 9], SamplingParams()))
    assert hit.num_tokens == 4 and [n.tokens for n in hit.nodes] == [(1, 2), (3, 4)]
    assert cm.lookup(Sequence("q", 0, [1, 2, 3, 4], SamplingParams())).num_tokens == 0  # never the whole prompt
    finish(cm, [7, 8, 9])  # a newer chain: state after 2 tokens
    # Take every free block: then [3,4] (the older chain's leaf, with its checkpoint) goes first, then [1,2].
    taken = [cm.take_block() for _ in range(cm.blocks.num_free)]
    taken.append(cm.take_block())
    assert cm.stats.evicted_blocks == 1 and cm.index.num_checkpoints == 1
    assert cm.lookup(Sequence("q", 0, [1, 2, 3, 4, 9], SamplingParams())).num_tokens == 0
    assert cm.lookup(Sequence("q", 0, [7, 8, 9], SamplingParams())).num_tokens == 2
    taken.append(cm.take_block())
    assert cm.lookup(Sequence("q", 0, [7, 8, 9], SamplingParams())).num_tokens == 2  # [1,2] went, not [7,8]
    cm.release_blocks(taken)
    assert cm.reset_prefix_cache()
    assert cm.blocks.num_free == 6 and cm.checkpoint_rows.num_free == cm.checkpoint_rows.capacity


def test_checkpoint_pool_is_bounded_and_tails_copy_on_write():
    cm = cache(num_blocks=12)
    finish(cm, [1, 2, 3, 4])  # state after 3 tokens: a tail (3,) under [1,2], owning its partial block
    seq = Sequence("q", 0, [1, 2, 3, 8], SamplingParams())
    hit = cm.lookup(seq)
    assert hit.num_tokens == 3 and hit.checkpoint.is_tail
    seq.state_slot = cm.take_slot()
    cm.acquire(seq, hit, 4)
    copies = cm.take_copies()
    assert [c.kind for c in copies] == ["state", "block"]
    assert copies[1].src == hit.checkpoint.block and copies[1].dst == seq.block_table[1] != copies[1].src
    cm.release(seq)
    finish(cm, [5, 6, 7])
    finish(cm, [9, 10, 11])  # a third checkpoint: the pool holds two, so the oldest goes
    assert cm.index.num_checkpoints == 2 and cm.stats.evicted_checkpoints == 1
    assert cm.lookup(Sequence("q", 0, [1, 2, 3, 8], SamplingParams())).num_tokens == 0
    assert cm.num_free_slots == 2
    assert cm.reset_prefix_cache() and cm.blocks.num_free == 12
    assert cm.checkpoint_rows.num_free == cm.checkpoint_rows.capacity


def test_pure_ssm_index_prunes_path_nodes_with_their_checkpoint():
    cm = CacheManager(num_slots=1, num_blocks=0, block_size=0, num_checkpoints=1, prefix_key=0,
                      prefix_block_size=2)
    finish(cm, [1, 2, 3, 4, 5, 6])  # path nodes [1,2] [3,4] [5,6]... state after 5 tokens: tail (5,)
    assert cm.lookup(Sequence("q", 0, [1, 2, 3, 4, 5, 0], SamplingParams())).num_tokens == 5
    finish(cm, [7, 8])  # evicts the only checkpoint: its block-less path is pruned with it
    assert len(cm.index.nodes) == 1 and cm.index.num_checkpoints == 1
    assert cm.reset_prefix_cache() and not cm.index.nodes
    assert cm.checkpoint_rows.num_free == 1 and cm.slots.num_free == 1
