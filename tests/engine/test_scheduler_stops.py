"""The scheduler ends sequences in `update_from_output` (stop tokens after min_tokens, then
max_tokens and max_model_len) and frees their blocks in the same call; expectations by hand."""

from __future__ import annotations

from ernie_cluster.engine.kv_cache import KVCacheManager
from ernie_cluster.engine.request import Request, RequestStatus
from ernie_cluster.engine.scheduler import Scheduler, SchedulerConfig
from ernie_cluster.sampling_params import SamplingParams

STOP = 7


def run(script: list[int], max_tokens: int = 8, min_tokens: int = 0, max_model_len: int = 64):
    """Feed `script` to one 4-token-prompt request; returns (request, tokens it appended,
    scheduler) once it ends or the script runs out."""
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=max_model_len)
    scheduler = Scheduler(config, kv)
    request = Request(
        request_id="r",
        prompt_token_ids=[1, 2, 3, 4],
        params=SamplingParams(min_tokens=min_tokens),
        stop_token_ids=frozenset({STOP}),
        max_tokens=max_tokens,
        parent_id="r",
    )
    scheduler.add_request(request)
    appended = []
    for token in script:
        out = scheduler.schedule()
        appended += [t for _, ts in scheduler.update_from_output(out, {"r": [token]}) for t in ts]
        if request.is_finished:
            break
    return request, appended, scheduler


def test_a_stop_token_ends_the_sequence_and_frees_its_blocks():
    request, appended, scheduler = run([5, 6, STOP, 8])
    assert appended == [5, 6, STOP]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == STOP
    assert "r" not in scheduler.requests and not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache.num_free_blocks == 16


def test_min_tokens_hold_back_the_stop_token():
    request, appended, _ = run([STOP, 5, STOP, 6], min_tokens=3)
    assert appended == [STOP, 5, STOP]  # the third token reaches min_tokens
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_max_tokens_and_max_model_len_end_with_length():
    request, appended, _ = run([5] * 10, max_tokens=3)
    assert (appended, request.status) == ([5, 5, 5], RequestStatus.FINISHED_LENGTH)
    assert request.stop_reason is None
    request, appended, _ = run([5] * 10, max_tokens=8, max_model_len=6)
    assert (appended, request.status) == ([5, 5], RequestStatus.FINISHED_LENGTH)


def test_a_stop_token_at_the_length_limit_is_a_stop():
    request, appended, _ = run([5, STOP], max_tokens=2)
    assert appended == [5, STOP]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == STOP
