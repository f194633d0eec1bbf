"""The host KV tier under Ray Serve: a prompt evicted from the device pool by another one comes
back from the host, and /metrics shows the tier's counters and gauges (official openai client,
127.0.0.1, a port picked at run time)."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import running_serve_app

pytestmark = pytest.mark.slow

APP = "ernie-host-tier"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_checkpoint):
    with running_serve_app(
        APP,
        model=str(tiny_checkpoint),
        served_model_name=["tiny"],
        dtype="float32",
        num_kv_blocks=16,  # 256 tokens: one of the prompts below at a time
        max_model_len=256,
        kv_offload_gb=0.001,  # about 65 blocks of the tiny model's 16 KiB
    ) as base_url:
        yield base_url


def engine_samples(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("ernie_host_kv")
        for sample in family.samples
    }


def test_an_evicted_prompt_comes_back_from_the_host_and_metrics_show_it(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120)
    rng = random.Random(0)
    a = [rng.randrange(13, 500) for _ in range(200)]
    b = [rng.randrange(13, 500) for _ in range(240)]  # with its output, the whole pool

    def complete(prompt):
        out = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text, out.usage

    first, _ = complete(a)
    complete(b)  # needs the blocks a left cached: they go to the host
    again, usage = complete(a)
    assert again == first
    assert usage.prompt_tokens_details.cached_tokens == (199 // 16) * 16
    deadline = time.monotonic() + 30  # replicas post their stats periodically
    while True:
        found = engine_samples(server)
        if found.get("ernie_host_kv_hit_tokens_total", 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found["ernie_host_kv_hit_tokens_total"] == (199 // 16) * 16
    assert found["ernie_host_kv_blocks_loaded_total"] == 199 // 16
    assert found["ernie_host_kv_blocks_saved_total"] >= 199 // 16
    assert found["ernie_host_kv_bytes_moved_total"] > 0
    assert found["ernie_host_kv_blocks_capacity"] == (1 << 30) * 0.001 // 16384
    assert found["ernie_host_kv_blocks_used"] >= 199 // 16
