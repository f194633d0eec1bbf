"""/metrics against a live server: engine series typed right (cumulative `_total` series are
counters), KV blocks in use and in the pool, and `ernie_requests_total` counting every
generation request once, refused ones included (the counter middleware the Ray Serve apps
install)."""

from __future__ import annotations

import httpx
from http_fixtures import (
    scripted_engine,
    serve_app,
    serve_scripted_engine,
    settings_for,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.local_engine_client import LocalEngineClient

API_KEY = "sk-metrics-test"


def families(base_url: str) -> dict:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def request_counts(base_url: str) -> dict[str, float]:
    family = families(base_url)["ernie_requests"]
    return {s.labels["status"]: s.value for s in family.samples if s.name.endswith("_total")}


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 4, **fields}


def test_engine_series_counters_and_kv_blocks(tiny_checkpoint):
    with serve_scripted_engine(tiny_checkpoint, {"": "a b c"}) as served, served.http() as http:
        assert http.post("/v1/completions", json=completion()).status_code == 200
        found = families(served.base_url)
        for name in ("ernie_prompt_tokens", "ernie_generation_tokens", "ernie_num_preemptions"):
            assert found[name].type == "counter", name
            (sample,) = found[name].samples
            assert sample.name == f"{name}_total" and sample.labels == {"replica": "local"}
        assert found["ernie_generation_tokens"].samples[0].value >= 1
        assert found["ernie_prefix_cache_queries"].type == "counter"
        assert found["ernie_prefix_cache_hits"].type == "counter"
        # Every series named *_total belongs to a counter.
        for family in found.values():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    assert family.type == "counter", (family.name, family.type)

        kv_cache = served.engine.engine.kv_cache
        (capacity,) = found["ernie_kv_cache_blocks_capacity"].samples
        assert found["ernie_kv_cache_blocks_capacity"].type == "gauge"
        assert capacity.value == kv_cache.num_blocks
        (used,) = found["ernie_kv_cache_blocks_used"].samples
        assert used.value == kv_cache.num_blocks - kv_cache.num_free_blocks
        (ratio,) = found["ernie_kv_cache_usage_ratio"].samples
        assert ratio.value == used.value / capacity.value


def test_every_generation_request_is_counted_once(tiny_checkpoint):
    engine, _ = scripted_engine(tiny_checkpoint, {"": "a b c"}, max_model_len=64)
    settings = settings_for(
        engine.tokenizer,
        max_model_len=engine.engine.max_model_len,
        vocab_size=engine.engine.model_config.vocab_size,
        api_key=API_KEY,
    )
    serving = OpenAIServing(LocalEngineClient(engine), settings)
    app = build_http_app(serving)  # counts refusals itself, in every server
    with serve_app(app, engine, engine.tokenizer, API_KEY) as served, served.http() as http:
        sent = [
            ("/v1/completions", completion()),  # success
            ("/v1/completions", completion(stream=True)),  # success, counted at its end
            ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}),  # 400
            ("/v1/completions", completion(max_tokens="many")),  # 400 (validation)
            ("/v1/completions", completion(max_tokens=1000)),  # 400 (over max_model_len)
            ("/v1/completions", completion(model="no-such-model")),  # 404
        ]
        statuses = [http.post(path, json=body).status_code for path, body in sent]
        assert statuses == [200, 200, 400, 400, 400, 404]
        no_key = httpx.post(f"{served.base_url}/v1/completions", json=completion(), timeout=10)
        assert no_key.status_code == 401
        expected = {"success": 2, "bad_request": 3, "not_found": 1, "unauthorized": 1}
        assert wait_until(lambda: request_counts(served.base_url) == expected, 5.0), request_counts(
            served.base_url
        )
        # Other routes are not generation requests.
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/nothing-here").status_code == 404
        assert request_counts(served.base_url) == expected


def test_auth_all_routes_comes_from_the_settings(tiny_checkpoint):
    engine, _ = scripted_engine(tiny_checkpoint, {"": "a"}, max_model_len=64)
    settings = settings_for(engine.tokenizer, api_key=API_KEY, auth_all_routes=True)
    app = build_http_app(OpenAIServing(LocalEngineClient(engine), settings))
    with serve_app(app, engine, engine.tokenizer, API_KEY) as served:
        assert httpx.get(f"{served.base_url}/metrics", timeout=10).status_code == 401
        assert httpx.get(f"{served.base_url}/health", timeout=10).status_code == 200
        with served.http() as http:
            assert http.get("/metrics").status_code == 200
