"""AsyncLLMEngine: streamed deltas add up to the offline result; cancelling aborts."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import assert_no_leaks

from ernie_cluster import SamplingParams
from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.async_engine import AsyncLLMEngine


@pytest.fixture
def engine(tiny_checkpoint):
    config = EngineConfig(model=str(tiny_checkpoint), dtype="float32", show_progress=False)
    instance = AsyncLLMEngine.from_config(config)
    yield instance
    asyncio.run(instance.shutdown())


async def collect(engine, prompt, params, request_id):
    text, tokens, finals = "", [], []
    async for out in engine.generate(prompt, params, request_id):
        for sample in out.outputs:
            text += sample.text
            tokens += sample.token_ids
        if out.finished:
            finals.append(out)
    return text, tokens, finals


def test_stream_concatenates_to_offline_output(engine):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    prompt = "你好, streaming 🙂 world"

    async def main():
        streamed = await asyncio.gather(
            *(collect(engine, prompt, params, f"s{i}") for i in range(3))
        )
        return streamed

    streamed = asyncio.run(main())
    offline = engine.engine  # same engine, synchronous API
    offline.add_request("offline", prompt, params)
    final = None
    while offline.has_unfinished_requests():
        for out in offline.step():
            final = out
    for text, tokens, finals in streamed:
        assert tokens == final.outputs[0].token_ids
        assert text == final.outputs[0].text
        assert "\ufffd" not in text or "\ufffd" in final.outputs[0].text
        assert len(finals) == 1 and finals[0].outputs[0].finish_reason == "length"


def test_stream_never_sends_a_stop_string(engine):
    async def main():
        base = SamplingParams(temperature=1.0, seed=9, max_tokens=30, ignore_eos=True)
        text, _, _ = await collect(engine, "stop test", base, "probe")
        stop = text[10:13]
        cut = SamplingParams(temperature=1.0, seed=9, max_tokens=30, ignore_eos=True, stop=[stop])
        chunks = []
        async for out in engine.generate("stop test", cut, "cut"):
            chunks.append(out.outputs[0].text if out.outputs else "")
        return text, stop, chunks

    text, stop, chunks = asyncio.run(main())
    assert "".join(chunks) == text[: text.find(stop)]
    assert all(stop not in "".join(chunks[: i + 1]) for i in range(len(chunks)))


def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        streams = [engine.generate([5] * 300, params, f"c{i}") for i in range(4)]
        for stream in streams:
            await stream.__anext__()
        assert engine.get_stats().kv_blocks_used > 0
        for stream in streams:
            await stream.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert_no_leaks(engine.engine)


def test_bad_request_raises_before_streaming(engine):
    async def main():
        with pytest.raises(ValueError, match="maximum context length is 4096"):
            async for _ in engine.generate([1] * 10, SamplingParams(max_tokens=10**6), "big"):
                pass

    asyncio.run(main())
    assert engine.is_healthy


def test_slow_consumer_gets_merged_deltas(engine):
    """A consumer that falls behind receives pending deltas merged, and nothing is lost."""

    async def main():
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)
        items, text, tokens = 0, "", []
        async for out in engine.generate("slow consumer", params, "slow"):
            items += 1
            text += out.outputs[0].text if out.outputs else ""
            tokens += out.outputs[0].token_ids if out.outputs else []
            await asyncio.sleep(0.05)
        return items, text, tokens

    items, text, tokens = asyncio.run(main())
    reference = engine.engine
    reference.add_request(
        "ref",
        "slow consumer",
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True),
    )
    final = None
    while reference.has_unfinished_requests():
        for out in reference.step():
            final = out
    assert tokens == final.outputs[0].token_ids and text == final.outputs[0].text
    assert items < 30
