"""BlockPool: exact block ids, LRU eviction order, ref counts, collisions, hash determinism."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ernie_cluster.engine.kv_cache import block_pool
from ernie_cluster.engine.kv_cache.block_pool import BlockPool, hash_block_tokens

TOKENS_A = list(range(16))
TOKENS_B = list(range(100, 116))


def free_ids(pool: BlockPool) -> list[int]:
    """The free list head to tail, read through the pool's own pointers."""
    ids = []
    node = pool._sentinel.next_free
    while node is not pool._sentinel:
        ids.append(node.block_id)
        node = node.next_free
    return ids


def test_fresh_pool_allocates_ids_in_order() -> None:
    pool = BlockPool(4)
    assert [pool.allocate().block_id for _ in range(4)] == [0, 1, 2, 3]
    assert pool.num_free_blocks == 0
    assert pool.num_used_blocks == 4
    assert pool.usage == 1.0
    with pytest.raises(RuntimeError, match="0 of 4"):
        pool.allocate()


def test_free_then_allocate_is_lru() -> None:
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    pool.free_blocks([blocks[2], blocks[0], blocks[3]])
    assert free_ids(pool) == [2, 0, 3]
    assert [pool.allocate().block_id for _ in range(3)] == [2, 0, 3]


def test_shared_blocks_are_freed_at_last_reference() -> None:
    pool = BlockPool(3)
    block = pool.allocate()
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert free_ids(pool) == [1, 2, 0]
    with pytest.raises(ValueError, match="double free of KV block 0"):
        pool.free_blocks([block])


def test_cached_free_block_is_reused_by_same_prefix() -> None:
    pool = BlockPool(4)
    block = pool.allocate()
    h = hash_block_tokens(None, TOKENS_A)
    assert pool.cache_full_block(block, h, TOKENS_A)
    pool.free_blocks([block])
    assert pool.num_free_blocks == 4
    assert pool.num_cached_blocks == 1

    hit = pool.get_cached_block(h, TOKENS_A)
    assert hit is block and hit.block_id == 0
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert pool.num_free_blocks == 3
    assert free_ids(pool) == [1, 2, 3]
    assert pool.allocate().block_id == 1


def test_allocation_evicts_least_recently_freed_cached_blocks() -> None:
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    hashes = []
    parent = None
    for i, block in enumerate(blocks):
        tokens = list(range(16 * i, 16 * (i + 1)))
        parent = hash_block_tokens(parent, tokens)
        hashes.append(parent)
        pool.cache_full_block(block, parent, tokens)
    pool.free_blocks([blocks[3], blocks[1], blocks[0], blocks[2]])
    assert pool.num_cached_blocks == 4

    assert [pool.allocate().block_id for _ in range(2)] == [3, 1]
    assert blocks[3].block_hash is None and blocks[1].block_hash is None
    assert hashes[3] not in pool._cached and hashes[1] not in pool._cached
    assert pool.num_cached_blocks == 2
    assert pool._cached[hashes[0]] is blocks[0]
    assert pool._cached[hashes[2]] is blocks[2]


def test_colliding_hash_never_returns_wrong_block() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(), pool.allocate()
    assert pool.cache_full_block(first, 42, TOKENS_A)
    # Same key, different tokens: the first writer keeps the key.
    assert not pool.cache_full_block(second, 42, TOKENS_B)
    assert second.block_hash is None
    assert pool.get_cached_block(42, TOKENS_B) is None
    # Same key and tokens but a different parent: another position in another sequence.
    assert pool.get_cached_block(42, TOKENS_A, parent_hash=7) is None
    assert pool.get_cached_block(42, TOKENS_A) is first


def test_publish_rules() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    pool.cache_full_block(block, 1, TOKENS_A)
    with pytest.raises(ValueError, match="already published"):
        pool.cache_full_block(block, 2, TOKENS_A)
    with pytest.raises(ValueError, match="cannot publish free KV block 1"):
        pool.cache_full_block(pool.blocks[1], 3, TOKENS_A)


def test_reset_prefix_cache_drops_only_free_hashes() -> None:
    pool = BlockPool(3)
    used, freed = pool.allocate(), pool.allocate()
    pool.cache_full_block(used, 1, TOKENS_A)
    pool.cache_full_block(freed, 2, TOKENS_B)
    pool.free_blocks([freed])
    assert not pool.reset_prefix_cache()
    assert freed.block_hash is None
    assert pool.get_cached_block(1, TOKENS_A) is used
    pool.free_blocks([used])
    assert pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0
    assert pool.num_free_blocks == 3


def test_caching_disabled_pool_never_publishes() -> None:
    pool = BlockPool(2, enable_caching=False)
    block = pool.allocate()
    assert not pool.cache_full_block(block, 1, TOKENS_A)
    assert pool.get_cached_block(1, TOKENS_A) is None


def test_pool_rejects_empty_size() -> None:
    with pytest.raises(ValueError, match="got 0"):
        BlockPool(0)


def test_hash_chains_parent_and_tokens() -> None:
    h0 = hash_block_tokens(None, TOKENS_A)
    assert h0 == hash_block_tokens(None, tuple(TOKENS_A))
    assert 0 <= h0 < 2**64
    assert hash_block_tokens(h0, TOKENS_B) != hash_block_tokens(None, TOKENS_B)
    # "No parent" and a parent hash of 0 are different chains.
    assert hash_block_tokens(0, TOKENS_A) != h0
    with pytest.raises(ValueError, match="parent_hash=-1"):
        hash_block_tokens(-1, TOKENS_A)


def test_hash_is_deterministic_across_processes() -> None:
    # The child loads block_pool.py by path: it has no package imports, and this skips the
    # package's heavy top-level imports (torch).
    code = (
        "import runpy, sys;"
        "h = runpy.run_path(sys.argv[1])['hash_block_tokens'];"
        "print(h(h(None, range(16)), range(100, 116)))"
    )
    expected = hash_block_tokens(hash_block_tokens(None, TOKENS_A), TOKENS_B)
    for seed in ("0", "12345"):
        result = subprocess.run(
            [sys.executable, "-c", code, block_pool.__file__],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert int(result.stdout) == expected
