"""Model-free tests of the block pool and the KV cache manager: exact ids, eviction order."""

import pytest

from engine.block_pool import BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.sequence import Sequence


def seq(tokens, sid=0):
    return Sequence(seq_id=sid, request=None, token_ids=list(tokens), num_prompt_tokens=len(tokens))


def test_allocate_release_order_and_refcounts():
    pool = BlockPool(6)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free_blocks == 3
    pool.acquire([1])
    pool.release([0, 1, 2])
    assert pool.blocks[1].ref_cnt == 1
    # Blocks without a hash are worthless: they go to the front, last freed first.
    assert pool.free_order() == [2, 0, 3, 4, 5]
    pool.release([1])
    pool.check_consistency()
    with pytest.raises(RuntimeError):
        pool.release([1])
    with pytest.raises(RuntimeError):
        pool.allocate(7)


def test_cached_blocks_evicted_least_recently_used_first():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    for bid, h in zip((a, b, c), (b"ha", b"hb", b"hc")):
        pool.set_hash(bid, h)
    pool.release([b])  # freed first: least recently used
    pool.release([a])
    pool.release([d])  # no hash: to the front
    pool.release([c])
    assert pool.free_order() == [d, b, a, c]
    assert pool.lookup(b"hb") == b
    got = pool.allocate(2)
    assert got == [d, b]
    assert pool.lookup(b"hb") is None  # evicted when handed out again
    assert pool.lookup(b"ha") == a and pool.lookup(b"hc") == c
    # A hit revives a free cached block: it leaves the free queue.
    pool.acquire([a])
    assert pool.free_order() == [c]
    pool.release([a, *got])
    pool.check_consistency()


def test_prefix_hits_exact_blocks_and_never_cover_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4, hash_salt="m")
    s1 = seq(range(12), 1)  # three full blocks
    copies = []
    assert kv.allocate_slots(s1, 12, copies)
    assert s1.block_table == [0, 1, 2]
    s1.num_computed_tokens = 12
    kv.cache_computed_blocks(s1)
    # Same 12 tokens: the last block may not be a hit (its last token's logits are needed).
    s2 = seq(range(12), 2)
    assert kv.find_cached_prefix(s2) == [0, 1]
    # 13 tokens sharing all three blocks hits all three.
    s3 = seq(list(range(12)) + [99], 3)
    hits = kv.find_cached_prefix(s3)
    assert hits == [0, 1, 2]
    assert kv.allocate_slots(s3, 1, copies, cached_blocks=hits)
    assert s3.block_table == [0, 1, 2, 3] and s3.num_computed_tokens == 12
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 2, 1]
    # A different first block shares nothing, even with equal later tokens (chained hashes).
    s4 = seq([7, 7, 7, 7] + list(range(4, 12)) + [1], 4)
    assert kv.find_cached_prefix(s4) == []
    kv.free(s1)
    kv.free(s3)
    assert kv.pool.num_free_blocks == 8
    # Freed tail first: the shared head stays cached longest.
    assert kv.pool.free_order()[-3:] == [2, 1, 0]
    assert kv.find_cached_prefix(seq(list(range(12)) + [5])) == [0, 1, 2]


def test_model_salt_separates_caches():
    a = KVCacheManager(4, 4, hash_salt="model-a")
    b = KVCacheManager(4, 4, hash_salt="model-b")
    sa, sb = seq(range(5)), seq(range(5))
    a._update_hashes(sa, 4)
    b._update_hashes(sb, 4)
    assert sa.block_hashes != sb.block_hashes


def test_fork_then_copy_on_write_of_partial_tail():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    parent = seq(range(6), 1)
    copies = []
    assert kv.allocate_slots(parent, 6, copies)
    parent.num_computed_tokens = 6
    child = seq(range(6), 2)
    kv.fork(parent, child)
    assert child.block_table == parent.block_table == [0, 1]
    assert kv.pool.blocks[1].ref_cnt == 2
    parent.token_ids.append(50)
    child.token_ids.append(51)
    assert kv.allocate_slots(parent, 1, copies)
    assert copies == [(1, 2)] and parent.block_table == [0, 2]
    assert kv.allocate_slots(child, 1, copies)
    assert copies == [(1, 2)] and child.block_table == [0, 1]  # sole owner now: no copy
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free_blocks == 6
    kv.pool.check_consistency()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s = seq(range(12))
    before = kv.pool.free_order()
    assert not kv.allocate_slots(s, 12, [])
    assert s.block_table == [] and kv.pool.free_order() == before
