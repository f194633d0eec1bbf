"""Ray executor behaviour: sharded residency, two instances on one host, dead workers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from engine_helpers import assert_no_leaks

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.async_engine import AsyncLLMEngine, EngineDeadError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [300] * 40, [42]]


def test_each_rank_holds_half_the_experts(tiny_checkpoint, ray_cluster):
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as single:
        (whole,) = single.engine.executor.collective_rpc("resident_parameter_bytes")
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=2,
        expert_parallel_size=2,
    ) as sharded:
        per_rank = sharded.engine.executor.collective_rpc("resident_parameter_bytes")
    assert whole["experts"] > 0
    assert [r["experts"] for r in per_rank] == [whole["experts"] // 2] * 2


def test_two_instances_share_the_host(tiny_checkpoint, ray_cluster):
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as single:
        expected = [o.outputs[0].token_ids for o in single.generate(PROMPTS, GREEDY)]
    kwargs = dict(
        dtype="float32", show_progress=False, tensor_parallel_size=2, expert_parallel_size=2
    )
    first = LLM(model=str(tiny_checkpoint), **kwargs)
    second = LLM(model=str(tiny_checkpoint), **kwargs)
    try:
        results: dict[int, list] = {}

        def run(index: int, llm: LLM) -> None:
            results[index] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS * 3, GREEDY)]

        threads = [
            threading.Thread(target=run, args=(i, llm)) for i, llm in enumerate((first, second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert results == {0: expected * 3, 1: expected * 3}
    finally:
        first.shutdown()
        second.shutdown()


def test_killed_worker_fails_requests_fast_and_engine_can_be_rebuilt(tiny_checkpoint, ray_cluster):
    config = EngineConfig(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=2,
        expert_parallel_size=2,
    )

    async def main() -> float:
        engine = AsyncLLMEngine.from_config(config)
        long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
        streams = [engine.generate([7] * 20, long, f"r{i}") for i in range(3)]
        for stream in streams:
            await stream.__anext__()

        async def drain(stream):
            async for _ in stream:
                pass

        killed_at = time.monotonic()
        ray_cluster.kill(engine.engine.executor.workers[1], no_restart=True)
        results = await asyncio.wait_for(
            asyncio.gather(*(drain(s) for s in streams), return_exceptions=True), timeout=5
        )
        elapsed = time.monotonic() - killed_at
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "worker" in str(results[0])
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate([1, 2], GREEDY, "after-death"):
                pass
        await engine.shutdown()

        rebuilt = AsyncLLMEngine.from_config(config)
        try:
            tokens = []
            async for out in rebuilt.generate([5, 6, 7], GREEDY, "again"):
                tokens += out.outputs[0].token_ids if out.outputs else []
            assert len(tokens) == 16
            rebuilt.check_health()
            assert_no_leaks(rebuilt.engine)
        finally:
            await rebuilt.shutdown()
        return elapsed

    assert asyncio.run(main()) < 5.0
