"""KVCacheManager: block tables, prefix hits, eviction order, atomic allocation, no leaks."""

from __future__ import annotations

import random

import pytest

from ernie_cluster.engine.kv_cache import kv_cache_manager
from ernie_cluster.engine.kv_cache.kv_cache_manager import KVCacheManager

BS = 16


def tokens(*block_seeds: int, extra: int = 0) -> list[int]:
    """One 16-token block per seed (seed s -> 1000*s .. 1000*s+15), then `extra` tokens."""
    out = [1000 * s + i for s in block_seeds for i in range(BS)]
    return out + [7] * extra


def run_prompt(kv: KVCacheManager, request_id: str, prompt: list[int]) -> list[int]:
    """Admit, prefill the whole prompt in one step and publish its full blocks."""
    hit_ids, _ = kv.get_computed_blocks(request_id, prompt)
    table = kv.allocate_slots(request_id, len(prompt), hit_ids)
    assert table is not None
    kv.cache_blocks(request_id, prompt, len(prompt))
    return table


def test_tables_grow_with_fresh_ids() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert kv.allocate_slots("a", 20) == [0, 1]
    assert kv.allocate_slots("b", 1) == [2]
    assert kv.allocate_slots("a", 33) == [0, 1, 3]
    assert kv.allocate_slots("a", 30) == [0, 1, 3]  # never shrinks
    assert kv.get_block_ids("a") == [0, 1, 3]
    assert kv.get_block_ids("unknown") == []
    assert kv.num_free_blocks == 4
    assert kv.usage == 0.5


def test_free_releases_tail_blocks_first() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    assert kv.allocate_slots("a", 48) == [0, 1, 2]
    kv.free("a")
    assert kv.allocate_slots("b", 48) == [2, 1, 0]


def test_cached_free_prefix_is_reused_with_same_ids() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = tokens(1, 2, extra=8)
    assert run_prompt(kv, "a", prompt) == [0, 1, 2]
    kv.free("a")  # free list: 3, 2, 1, 0
    hit_ids, num_computed = kv.get_computed_blocks("b", tokens(1, 2, extra=3))
    assert (hit_ids, num_computed) == ([0, 1], 32)
    assert kv.allocate_slots("b", 35, hit_ids) == [0, 1, 3]
    assert kv._pool.blocks[0].ref_cnt == 1
    assert kv.num_free_blocks == 1


def test_shared_prefix_ref_counts() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    run_prompt(kv, "a", tokens(1, 2, extra=1))
    table_b = run_prompt(kv, "b", tokens(1, 2, extra=5))
    assert table_b == [0, 1, 3]
    blocks = kv._pool.blocks
    assert [blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    kv.free("a")
    assert [blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    assert kv.num_free_blocks == 3
    kv.free("b")
    assert kv.num_free_blocks == 6


def test_never_returns_whole_prompt_as_computed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    run_prompt(kv, "a", tokens(1, 2, extra=1))
    kv.free("a")
    assert kv.get_computed_blocks("exact", tokens(1, 2)) == ([0], 16)
    assert kv.get_computed_blocks("one", tokens(1)) == ([], 0)
    assert kv.get_computed_blocks("empty", []) == ([], 0)
    assert kv.get_computed_blocks("longer", tokens(1, 2, extra=1)) == ([0, 1], 32)


def test_allocation_evicts_tail_of_least_recently_freed_sequence() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    run_prompt(kv, "a", tokens(1, 2))  # blocks 0, 1 published
    kv.free("a")  # free list: 2, 3, 1, 0
    pool = kv._pool
    hash_1 = pool.blocks[1].block_hash
    assert kv.allocate_slots("c", 48) == [2, 3, 1]
    assert pool.blocks[1].block_hash is None
    assert hash_1 not in pool._cached
    assert pool.num_cached_blocks == 1
    assert kv.get_computed_blocks("d", tokens(1, 2, extra=1)) == ([0], 16)


def test_allocate_slots_is_atomic_on_failure() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    run_prompt(kv, "a", tokens(1, 2, extra=1))  # [0, 1, 2]
    kv.free("a")  # free list: 3, 2, 1, 0
    assert kv.allocate_slots("x", 16) == [3]
    kv.cache_blocks("x", tokens(9), 16)
    hit_ids, _ = kv.get_computed_blocks("b", tokens(1, 2, extra=20))
    assert hit_ids == [0, 1]
    # 4 blocks = 2 cached-free hits + 2 new, but only 3 blocks are free (2 of them the hits).
    assert kv.allocate_slots("b", 52, hit_ids) is None
    pool = kv._pool
    assert kv.num_free_blocks == 3
    assert [pool.blocks[i].ref_cnt for i in (0, 1)] == [0, 0]
    assert kv.get_block_ids("b") == []
    assert pool.num_cached_blocks == 3
    assert kv.allocate_slots("b", 48, hit_ids) == [0, 1, 2]

    # A request that already holds blocks fails atomically too.
    assert kv.allocate_slots("x", 33) is None
    assert kv.get_block_ids("x") == [3]
    assert kv.num_free_blocks == 0


def test_stale_computed_blocks_are_rejected() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    run_prompt(kv, "a", tokens(1, extra=1))
    kv.free("a")  # free list: 1, 0
    hit_ids, _ = kv.get_computed_blocks("b", tokens(1, extra=1))
    assert hit_ids == [0]
    assert kv.allocate_slots("c", 32) == [1, 0]  # evicts block 0
    kv.free("c")
    with pytest.raises(ValueError, match="call get_computed_blocks again"):
        kv.allocate_slots("b", 17, hit_ids)


def test_concurrent_identical_prefix_is_published_once() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = tokens(1, 2, 3, extra=1)
    assert kv.get_computed_blocks("a", prompt) == ([], 0)
    assert kv.get_computed_blocks("b", prompt) == ([], 0)
    assert kv.allocate_slots("a", 49) == [0, 1, 2, 3]
    assert kv.allocate_slots("b", 49) == [4, 5, 6, 7]
    kv.cache_blocks("a", prompt, 16)  # a's chunked prefill has written one block
    kv.cache_blocks("b", prompt, 49)
    pool = kv._pool
    assert pool.blocks[4].block_hash is None  # duplicate of block 0 stays unpublished
    assert [pool.blocks[i].block_hash is not None for i in (0, 5, 6)] == [True] * 3
    kv.cache_blocks("a", prompt, 49)  # b already published a's blocks 1 and 2
    assert [pool.blocks[i].block_hash for i in (1, 2)] == [None, None]
    kv.free("a")
    kv.free("b")
    assert kv.get_computed_blocks("c", prompt) == ([0, 5, 6], 48)


def test_hash_collision_does_not_return_wrong_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache_manager, "hash_block_tokens", lambda parent, toks: 42)
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    run_prompt(kv, "a", tokens(1, extra=1))
    kv.free("a")
    assert kv.get_computed_blocks("b", tokens(2, extra=1)) == ([], 0)
    # Same tokens at another position: the parent differs, so block 0 is not reused for it.
    assert kv.get_computed_blocks("c", tokens(1, 1, extra=1)) == ([0], 16)


def test_no_block_leak_after_random_workload() -> None:
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=40, block_size=BS)
    prefixes = [tokens(1, 2), tokens(1, 3), tokens(4)]
    running: dict[str, tuple[list[int], int]] = {}
    for step in range(300):
        if len(running) < 4:
            rid = f"r{step}"
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(40))]
            hit_ids, num_computed = kv.get_computed_blocks(rid, prompt)
            if kv.allocate_slots(rid, num_computed, hit_ids) is None:
                kv.free(rid)
            else:
                running[rid] = (prompt, num_computed)
        for rid, (seq, done) in list(running.items()):
            target = min(len(seq), done + rng.randrange(1, 24))
            if kv.allocate_slots(rid, target + 1) is None:
                kv.free(rid)  # preempted
                del running[rid]
                continue
            kv.cache_blocks(rid, seq, target)
            if target == len(seq):
                seq = [*seq, rng.randrange(50)]  # decode appends a token
            running[rid] = (seq, target)
            if len(seq) > 90 or rng.random() < 0.05:
                kv.free(rid)
                del running[rid]
    for rid in list(running):
        kv.free(rid)
    assert kv.num_free_blocks == kv.num_blocks
    assert all(block.ref_cnt == 0 for block in kv._pool.blocks)
    assert kv.stats.prefix_cache_hits > 0


def test_hit_rate_stats() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert kv.stats.hit_rate == 0.0
    run_prompt(kv, "a", tokens(1, 2, extra=8))  # 40 queried, 0 hit
    run_prompt(kv, "b", tokens(1, 2, extra=1))  # 33 queried, 32 hit
    run_prompt(kv, "c", tokens(1, 5, extra=7))  # 39 queried, 16 hit
    assert kv.stats.prefix_cache_queries == 112
    assert kv.stats.prefix_cache_hits == 48
    assert kv.stats.hit_rate == pytest.approx(48 / 112)


def test_caching_disabled_only_allocates_and_frees() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    prompt = tokens(1, 2, extra=1)
    assert kv.get_computed_blocks("a", prompt) == ([], 0)
    assert kv.allocate_slots("a", 33) == [0, 1, 2]
    kv.cache_blocks("a", prompt, 33)
    assert kv._pool.num_cached_blocks == 0
    kv.free("a")
    assert kv.get_computed_blocks("b", prompt) == ([], 0)
    assert kv.stats.prefix_cache_queries == 0
    assert kv.num_free_blocks == 4


def test_admission_helpers_and_bad_input() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert [kv.num_blocks_needed(n) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert kv.can_ever_fit(64)
    assert not kv.can_ever_fit(65)
    with pytest.raises(ValueError, match="got -1"):
        kv.num_blocks_needed(-1)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        KVCacheManager(num_blocks=4, block_size=0)
    kv.free("never-seen")  # idempotent
    kv.allocate_slots("a", 16)
    with pytest.raises(ValueError, match="only accepted on its first call"):
        kv.allocate_slots("a", 32, [0])
    with pytest.raises(ValueError, match="num_computed_tokens=20 outside"):
        kv.cache_blocks("a", tokens(1), 20)
    with pytest.raises(ValueError, match="block id 9 outside"):
        kv.allocate_slots("b", 32, [9])
