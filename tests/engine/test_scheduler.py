"""Scheduler unit tests with a stub model: exact token counts, block ids, preemption order."""

from __future__ import annotations

import pytest

from ernie_cluster.engine.kv_cache import KVCacheManager
from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.scheduler import Scheduler, SchedulerConfig
from ernie_cluster.sampling_params import SamplingParams


def make_scheduler(num_blocks=16, block_size=4, budget=8, max_seqs=4, caching=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=128
    )
    return Scheduler(config, kv)


_seq = iter(range(10**6))


def req(name: str, prompt: list[int], max_tokens=8, priority=0) -> Request:
    return Request(
        request_id=name,
        prompt_token_ids=prompt,
        params=SamplingParams(),
        stop_token_ids=frozenset(),
        max_tokens=max_tokens,
        parent_id=name,
        priority=priority,
        arrival_seq=next(_seq),
    )


def step(scheduler, token=99):
    out = scheduler.schedule()
    sampled = {}
    for rid, _n in out.num_scheduled_tokens.items():
        r = scheduler.requests[rid]
        if r.num_computed_tokens == r.num_tokens:
            sampled[rid] = [token]
    scheduler.update_from_output(out, sampled)
    return out


def test_chunked_prefill_and_decodes_share_the_budget():
    s = make_scheduler(budget=8)
    s.add_request(req("a", list(range(10))))
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 8}
    assert out.new_requests[0].block_ids == [0, 1]
    s.add_request(req("b", list(range(100, 106))))
    out = step(s)  # a finishes its prompt (2 tokens), b gets the other 6
    assert out.num_scheduled_tokens == {"a": 2, "b": 6}
    assert out.cached_requests[0].new_block_ids == [2]
    assert out.new_requests[0].block_ids == [3, 4]
    out = step(s)  # both decode
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}


def test_preemption_takes_the_newest_and_recomputes():
    s = make_scheduler(num_blocks=6, budget=64)
    s.add_request(req("old", list(range(11)), max_tokens=9))  # 3 blocks, up to 5
    s.add_request(req("new", list(range(20, 31)), max_tokens=9))  # 3 blocks, up to 5
    step(s)  # both prompts: 11 tokens each, 3 blocks each
    step(s)  # the 12th token of each still fits in 3 blocks
    assert s.kv_cache.num_free_blocks == 0
    step(s)  # old needs a 4th block for its 13th token -> new (the newest) is preempted
    assert s.requests["new"].status == RequestStatus.PREEMPTED
    assert s.requests["new"].num_computed_tokens == 0
    assert s.stats.num_preemptions == 1
    for _ in range(20):
        if s.requests.get("old") and s.requests["old"].num_output_tokens >= 8:
            s.finish_requests(["old"], RequestStatus.FINISHED_LENGTH)
        out = step(s)
        resumed = [c for c in out.cached_requests if c.resumed]
        if resumed:
            # recompute starts from the prefix cache: whole blocks only, never the last token
            assert resumed[0].req_id == "new"
            assert resumed[0].num_computed_tokens % 4 == 0
            assert resumed[0].num_computed_tokens < s.requests["new"].num_tokens
            return
    pytest.fail("preempted request never resumed")


def test_priority_orders_admission():
    s = make_scheduler(budget=4, max_seqs=1)
    s.add_request(req("low", [1, 2, 3], priority=5))
    s.add_request(req("high", [4, 5, 6], priority=-1))
    assert list(step(s).num_scheduled_tokens) == ["high"]


def test_prefix_hit_skips_cached_blocks():
    s = make_scheduler(budget=64)
    s.add_request(req("a", list(range(9))))
    step(s)
    s.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    s.add_request(req("b", [*list(range(8)), 50, 51]))
    out = step(s)
    assert out.new_requests[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"b": 2}
    assert out.finished_req_ids == ["a"]


def test_too_big_rejected_at_admission():
    s = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=r"needs 5 KV blocks for 20 tokens"):
        s.add_request(req("x", list(range(12)), max_tokens=8))
