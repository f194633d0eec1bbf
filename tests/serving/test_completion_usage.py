"""Completions report prefix-cache hits in usage.prompt_tokens_details, like chat."""

from __future__ import annotations

import asyncio

import httpx

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.serving.local_server import build_local_app


def test_cached_tokens_in_completion_usage(tiny_checkpoint):
    app, engine = build_local_app(
        EngineConfig(model=str(tiny_checkpoint), dtype="float32", show_progress=False),
        served_model_names=["tiny"],
    )
    body = {"model": "tiny", "prompt": list(range(20, 84)), "max_tokens": 2}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = (await http.post("/v1/completions", json=body)).json()
            second = (await http.post("/v1/completions", json=body)).json()
            streamed = await http.post(
                "/v1/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
        await engine.shutdown()
        return first, second, streamed.text

    first, second, streamed = asyncio.run(main())
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # 64 prompt tokens: 3 whole blocks of 16 are reused; the last block is recomputed
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    assert '"cached_tokens":48' in streamed.replace(" ", "")


def test_byte_tokens_in_logprobs_keep_their_bytes(tiny_checkpoint):
    from ernie_cluster.serving.logprobs import chat_logprobs, completion_logprobs
    from ernie_cluster.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    first, second = tokenizer.encode("🙂")[:2]  # byte-fallback tokens of one character
    assert {first, second} <= tokenizer.byte_token_ids
    entries = [{first: -0.5, second: -1.0}, {second: -0.2, first: -2.0}]
    chat = chat_logprobs(tokenizer, [first, second], entries, top_n=2).content
    assert [c.bytes for c in chat] == [[0xF0], [0x9F]]
    assert "🙂".encode().startswith(b"".join(bytes(c.bytes) for c in chat))
    completion = completion_logprobs(tokenizer, [first, second], entries, top_n=2)
    assert all(len(top) == 2 for top in completion.top_logprobs)  # no collapsed keys
