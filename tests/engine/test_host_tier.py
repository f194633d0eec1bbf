"""The host KV tier without a model: LRU and pins of the host slots, the exact copies the KV
cache manager plans (write-on-evict, write-through, full and partial host hits), the LOADING
step of the scheduler, and the worker's copies against plain tensor indexing."""

from __future__ import annotations

import pytest
import torch

from ernie_cluster.engine.kv_cache import HostTier, KVCacheManager
from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.scheduler import Scheduler, SchedulerConfig
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.worker.kv_offload import HostKVPool, runs

BS = 4


def test_host_tier_lru_pins_and_collisions():
    tier = HostTier(2)
    assert tier.store(10, (1, 2), None) == 0
    assert tier.store(11, (3, 4), 10) == 1
    assert tier.store(10, (1, 2), None) is None  # already there: touched, no copy
    assert tier.lookup(11, (3, 4), 10) == 1
    assert tier.lookup(11, (3, 5), 10) is None  # same hash, other tokens: a miss
    assert tier.lookup(11, (3, 4), None) is None  # same hash, other parent: a miss
    assert tier.store(12, (5, 6), None) == 1  # evicts 11, the least recently used
    assert 11 not in tier and 10 in tier
    assert tier.pin(10) == 0  # matched for a load this step: pinned, most recent
    assert tier.store(13, (7, 8), None) == 1  # slot 0 is pinned: 12 goes instead
    assert tier.pin(13) == 1
    assert tier.store(14, (9, 9), None) is None  # every slot pinned: dropped, not written
    tier.release_pins()
    assert tier.store(15, (9, 9), None) == 0  # pins released: 10, now the LRU, makes room
    assert tier.stats.blocks_saved == 5  # 10, 11, 12, 13, 15
    assert tier.stats.blocks_dropped == 4  # 11, 12 and 10 evicted; 14 never written
    with pytest.raises(ValueError, match="got 0"):
        HostTier(0)


def prompt(seed: int, n: int) -> list[int]:
    return [seed * 1000 + i for i in range(n)]


def fill(kv: KVCacheManager, rid: str, tokens: list[int]) -> list[int]:
    """Admit, 'compute' and publish a request's whole prompt, then free it."""
    hit_ids, _ = kv.get_computed_blocks(rid, tokens)
    table = list(kv.allocate_slots(rid, len(tokens), hit_ids))
    kv.cache_blocks(rid, tokens, len(tokens))
    kv.free(rid)
    return table


def test_evicted_blocks_are_saved_and_come_back_by_copy():
    kv = KVCacheManager(4, BS, num_host_blocks=8)
    a = prompt(1, 9)  # blocks 0, 1 full and published, block 2 partial
    assert fill(kv, "a1", a) == [0, 1, 2]
    assert kv.take_copy_ops() == ([], [])  # nothing evicted yet
    # 13 other tokens need all 4 blocks: LRU order [3, 2, 1, 0] evicts a's 1 and 0.
    assert fill(kv, "b", prompt(2, 13)) == [3, 2, 1, 0]
    saves, loads = kv.take_copy_ops()
    assert saves == [(1, 0), (0, 1)] and loads == []
    # a returns: both of its full blocks are on the host (slot 1 holds block 0's KV).
    a2 = [*a, 5, 6]
    hit_ids, num_hit = kv.get_computed_blocks("a2", a2)
    assert (hit_ids, num_hit) == ([], 0)
    hashes = kv.match_host_blocks("a2", a2, 0)
    assert len(hashes) == 2
    table = kv.allocate_slots("a2", 2 * BS, hit_ids)
    kv.load_host_blocks("a2", hashes, 0)
    saves, loads = kv.take_copy_ops()
    assert table == [0, 1] and loads == [(1, 0), (0, 1)]
    # b's first full block sat in device block 1: it goes to the host (slot 2) before the
    # load overwrites it, since workers run a step's saves before its loads.
    assert saves == [(1, 2)]
    assert kv.host.stats.host_hit_tokens == 2 * BS


def test_partial_host_hit_continues_the_device_chain():
    kv = KVCacheManager(6, BS, num_host_blocks=1)
    a = prompt(1, 13)  # 3 full blocks
    assert fill(kv, "a", a) == [0, 1, 2, 3]
    fill(kv, "b", prompt(2, 8))  # takes blocks 4, 5: nothing evicted
    fill(kv, "c", prompt(3, 4))  # takes 3 (a's partial tail: unpublished, not saved)
    fill(kv, "d", prompt(4, 4))  # takes 2: a's third block goes to the host
    assert kv.take_copy_ops() == ([(2, 0)], [])
    a2 = [*a, 1]
    hit_ids, num_hit = kv.get_computed_blocks("a2", a2)
    assert (hit_ids, num_hit) == ([0, 1], 2 * BS)  # device holds the prefix ...
    hashes = kv.match_host_blocks("a2", a2, len(hit_ids))
    assert len(hashes) == 1  # ... the host its continuation
    table = kv.allocate_slots("a2", 3 * BS, hit_ids)
    kv.load_host_blocks("a2", hashes, len(hit_ids))
    assert kv.take_copy_ops()[1] == [(0, table[2])]
    # a chain that diverged before the host block does not reach it
    other = a[:4] + [7] * 9
    kv.free("a2")
    assert kv.match_host_blocks("o", other, 1) == []


def test_write_through_saves_on_publish_and_not_again_on_evict():
    kv = KVCacheManager(4, BS, num_host_blocks=8, write_through=True)
    fill(kv, "a", prompt(1, 9))
    assert kv.take_copy_ops() == ([(0, 0), (1, 1)], [])
    fill(kv, "b", prompt(2, 13))  # evicts a's blocks: already on the host, no copy
    saves, _ = kv.take_copy_ops()
    assert [slot for _, slot in saves] == [2, 3, 4]  # only b's own three full blocks
    assert kv.host.stats.blocks_saved == 5


def test_a_full_host_tier_evicts_its_lru_and_misses_cleanly():
    kv = KVCacheManager(4, BS, num_host_blocks=2)
    a = prompt(1, 9)
    fill(kv, "a", a)
    fill(kv, "b", prompt(2, 13))  # a's two blocks fill the host
    fill(kv, "c", prompt(3, 13))  # b's three push them out (LRU)
    assert kv.host.stats.blocks_dropped >= 2
    assert kv.match_host_blocks("a2", [*a, 1], 0) == []


def test_reset_prefix_cache_clears_the_host_tier():
    kv = KVCacheManager(4, BS, num_host_blocks=8)
    a = prompt(1, 9)
    fill(kv, "a", a)
    fill(kv, "b", prompt(2, 13))
    assert kv.match_host_blocks("a2", [*a, 1], 0)
    assert kv.reset_prefix_cache()
    assert kv.match_host_blocks("a3", [*a, 1], 0) == []


def test_the_tier_needs_prefix_caching():
    with pytest.raises(ValueError, match="needs prefix caching"):
        KVCacheManager(4, BS, enable_prefix_caching=False, num_host_blocks=4)


_seq = iter(range(10**6))


def req(name: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(
        request_id=name,
        prompt_token_ids=tokens,
        params=SamplingParams(),
        stop_token_ids=frozenset(),
        max_tokens=max_tokens,
        parent_id=name,
        arrival_seq=next(_seq),
    )


def run_to_end(s: Scheduler, name: str, max_steps: int = 50) -> list:
    outs = []
    for _ in range(max_steps):
        out = s.schedule()
        outs.append(out)
        sampled = {}
        for rid in out.num_scheduled_tokens:
            r = s.requests[rid]
            if r.num_computed_tokens == r.num_tokens:
                sampled[rid] = [99]
        for r, _token in s.update_from_output(out, sampled):
            if r.num_output_tokens >= r.max_tokens:
                s.finish_requests([r.request_id], RequestStatus.FINISHED_LENGTH)
        if name not in s.requests:
            return outs
    raise AssertionError(f"{name} did not finish in {max_steps} steps")


def evicted_to_host(num_host_blocks: int = 8, max_num_seqs: int = 4):
    """A scheduler over 8 device blocks after `a` (17 tokens: 4 full blocks) ran and `b`
    (needing all 8 blocks) pushed a's blocks down to the host; returns (scheduler, a)."""
    kv = KVCacheManager(8, BS, num_host_blocks=num_host_blocks)
    s = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64), kv)
    a = prompt(1, 17)
    s.add_request(req("a", a, max_tokens=1))
    run_to_end(s, "a")
    s.add_request(req("b", prompt(2, 29), max_tokens=1))
    run_to_end(s, "b")
    return s, a


def test_a_host_hit_waits_one_step_in_loading_while_the_batch_goes_on():
    s, a = evicted_to_host()
    kv = s.kv_cache
    s.add_request(req("long", prompt(3, 5), max_tokens=20))
    s.schedule()  # "long" runs; the pool now has 7 free blocks, a's prefix is on the host
    s.add_request(req("a2", [*a, 3, 4], max_tokens=1))
    out = s.schedule()
    assert "a2" not in out.num_scheduled_tokens and "long" in out.num_scheduled_tokens
    assert len(out.kv_loads) == 4 and s.requests["a2"].status == RequestStatus.LOADING
    out = s.schedule()
    assert out.num_scheduled_tokens["a2"] == 3  # 19 tokens, 16 loaded
    assert out.new_requests[0].num_computed_tokens == 16
    assert out.kv_loads == []
    assert kv.host.stats.host_hit_tokens == 16


def test_an_aborted_loading_request_frees_its_blocks():
    s, a = evicted_to_host()
    kv = s.kv_cache
    s.add_request(req("a2", [*a, 3], max_tokens=1))
    assert s.schedule().kv_loads
    s.finish_requests(["a2"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests() and kv.num_free_blocks == 8


def test_runs_merge_consecutive_pairs():
    assert runs([(3, 7), (4, 8), (5, 9), (9, 1), (1, 2), (2, 3)]) == [
        (3, 7, 3),
        (9, 1, 1),
        (1, 2, 2),
    ]


def test_host_pool_copies_match_indexing():
    torch.manual_seed(0)
    caches = [torch.randn(2, 6 * BS, 2, 3) for _ in range(2)]  # 6 blocks, 2 heads, dim 3
    pool = HostKVPool(caches, BS, num_host_blocks=4)
    assert pool.block_bytes == 2 * (2 * BS * 2 * 3 * 4)
    blocks = [c.view(2, 6, BS, 2, 3).clone() for c in caches]
    pool.execute(saves=[(5, 0), (2, 3)], loads=[])
    for layer, host in zip(blocks, pool.host_blocks, strict=True):
        assert torch.equal(host[:, 0], layer[:, 5]) and torch.equal(host[:, 3], layer[:, 2])
    pool.execute(saves=[(1, 1)], loads=[(3, 0), (1, 4)])  # saves first: slot 1 <- block 1
    for layer, cache in zip(blocks, caches, strict=True):
        now = cache.view(2, 6, BS, 2, 3)
        assert torch.equal(now[:, 0], layer[:, 2]) and torch.equal(now[:, 4], layer[:, 1])
        assert torch.equal(now[:, 5], layer[:, 5])  # untouched
    sized = HostKVPool.sized(caches, BS, offload_gib=0.0)
    assert sized is None
    assert HostKVPool.sized(caches, BS, 0.0, num_host_blocks=3).num_host_blocks == 3
    with pytest.raises(ValueError, match="holds no KV block"):
        HostKVPool.sized(caches, BS, offload_gib=1e-9)


def test_host_blocks_evicted_while_a_request_waits_mean_recompute():
    """a2's prefix is on the host when it arrives, but it waits (no free sequence slot) while
    the running request's growth pushes that prefix out of the small host tier; admitted
    later, it plans no load and computes its whole prompt."""
    s, a = evicted_to_host(num_host_blocks=4, max_num_seqs=1)
    kv = s.kv_cache
    assert len(kv.match_host_blocks("probe", [*a, 3], 0)) == 4
    kv.free("probe")
    kv.take_copy_ops()
    s.add_request(req("long", prompt(3, 9), max_tokens=20))
    s.add_request(req("a2", [*a, 3], max_tokens=1))
    outs = run_to_end(s, "long")  # a2 waits throughout: max_num_seqs=1
    assert all("a2" not in out.num_scheduled_tokens for out in outs)
    assert kv.host.stats.blocks_dropped >= 4  # long's growth pushed a's blocks out
    out = s.schedule()
    assert out.kv_loads == [] and out.num_scheduled_tokens == {"a2": 18}
    assert out.new_requests[0].num_computed_tokens == 0
