"""`--max-waiting-requests` counts the requests queued beyond the free batch slots: a burst on
an idle one-process server is admitted up to max_num_seqs + max_waiting_requests, and only
what is left over gets 503 + Retry-After."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from http_fixtures import openai_error, serve_local, serve_scripted_engine, wait_until

MAX_NUM_SEQS = 6
MAX_WAITING = 2
FITS = MAX_NUM_SEQS + MAX_WAITING


def completion(**overrides) -> dict:
    return {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, **overrides}


def test_idle_server_admits_a_burst_that_fits(tiny_checkpoint):
    """The real model: max_num_seqs + max_waiting_requests requests sent at once all succeed
    (before, every request past the waiting limit was turned away while the slots were free:
    they all sat in `waiting` until a step could move them)."""
    with (
        serve_local(
            tiny_checkpoint,
            engine_overrides={"max_num_seqs": MAX_NUM_SEQS},
            max_waiting_requests=MAX_WAITING,
        ) as served,
        served.http(timeout=120.0) as client,
        ThreadPoolExecutor(FITS) as pool,
    ):
        for _ in range(2):  # the second burst lands on an engine that has just gone idle
            bodies = [completion(stream=i % 2 == 1, prompt=f"burst {i}") for i in range(FITS)]
            responses = list(pool.map(lambda b: client.post("/v1/completions", json=b), bodies))
            assert [r.status_code for r in responses] == [200] * FITS, [
                r.text for r in responses if r.status_code != 200
            ]


def test_burst_beyond_slots_and_queue_is_turned_away(tiny_checkpoint):
    """Long requests fill the batch and the queue; exactly the surplus gets 503 at once, and
    the queued ones run once slots free up."""
    surplus = 3
    with (
        serve_scripted_engine(
            tiny_checkpoint,
            {"": "a b c d"},
            engine_overrides={"max_num_seqs": MAX_NUM_SEQS},
            step_delay_s=0.05,
            max_waiting_requests=MAX_WAITING,
        ) as served,
        served.http(timeout=60.0) as client,
        ThreadPoolExecutor(FITS + surplus) as pool,
    ):
        engine = served.engine
        scheduler = engine.engine.scheduler
        # 400 steps of 0.05 s: nobody finishes during the burst.
        body = completion(max_tokens=400, ignore_eos=True, stream=True)

        def open_stream() -> httpx.Response:
            request = client.build_request("POST", "/v1/completions", json=body)
            response = client.send(request, stream=True)
            if response.status_code != 200:
                response.read()
            return response

        burst = [pool.submit(open_stream) for _ in range(FITS + surplus)]
        try:
            # The running ones answer with their first token, the rejected ones at once; the
            # queued ones answer only once they are scheduled.
            settled = wait_until(
                lambda: (
                    sum(f.done() for f in burst) == MAX_NUM_SEQS + surplus
                    and len(scheduler.running) == MAX_NUM_SEQS
                    and len(scheduler.waiting) == MAX_WAITING
                ),
                timeout_s=30.0,
            )
            done = [f.result() for f in burst if f.done()]
            statuses = sorted(r.status_code for r in done)
            assert settled, (statuses, len(scheduler.running), len(scheduler.waiting))
            assert statuses == [200] * MAX_NUM_SEQS + [503] * surplus
            for response in done:
                if response.status_code == 503:
                    error = openai_error(response, 503)
                    assert error["code"] == "queue_full"
                    assert int(response.headers["retry-after"]) >= 1
                else:
                    response.close()  # aborts it: a queued request takes its slot
            queued = [f.result(timeout=30) for f in burst if f.result(timeout=30) not in done]
            assert [r.status_code for r in queued] == [200] * MAX_WAITING
        finally:
            for future in burst:
                future.result(timeout=30).close()
        assert wait_until(lambda: not engine.engine.has_unfinished_requests(), 10.0)
