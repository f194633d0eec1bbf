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
