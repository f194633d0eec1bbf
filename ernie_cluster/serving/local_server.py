"""Serving without Ray Serve: the engine and the HTTP app in one process (uvicorn).

Used by tests, benchmarks and `ernie-cluster serve --no-ray-serve` (smallest footprint); the
HTTP behaviour is the same app the Ray Serve ingress runs.
"""

from __future__ import annotations

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.async_engine import AsyncLLMEngine
from ernie_cluster.engine.llm_engine import LLMEngine
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.engine_client import LocalEngineClient
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.settings import (
    DEFAULT_MAX_BODY_BYTES,
    ServingSettings,
    generation_defaults,
)


def settings_for_engine(
    engine: LLMEngine,
    served_model_names: list[str] | None = None,
    reasoning_parser: str | None = None,
    tool_call_parser: str | None = None,
    api_key: str | None = None,
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> ServingSettings:
    return ServingSettings(
        served_model_names=served_model_names or [engine.config.model],
        max_model_len=engine.max_model_len,
        tokenizer=engine.tokenizer,
        vocab_size=engine.model_config.vocab_size,
        reasoning_parser=reasoning_parser,
        tool_call_parser=tool_call_parser,
        api_key=api_key,
        max_request_body_bytes=max_request_body_bytes,
        default_sampling=generation_defaults(engine.model_dir),
    )


def build_local_app(
    engine_config: EngineConfig,
    max_waiting_requests: int | None = None,
    **settings_kwargs,
):
    """(FastAPI app, AsyncLLMEngine) serving `engine_config` in this process."""
    engine = AsyncLLMEngine.from_config(engine_config)
    settings = settings_for_engine(engine.engine, **settings_kwargs)
    client = LocalEngineClient(engine, max_waiting_requests)
    return build_http_app(OpenAIServing(client, settings)), engine
