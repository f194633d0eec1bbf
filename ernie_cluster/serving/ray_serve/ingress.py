"""The Ray Serve ingress: OpenAIIngress (the FastAPI app) and ServeEngineClient, the
EngineClient over a DeploymentHandle to the model replicas (model_server.py).

Never imports the engine, the executor or torch: an autoscaled ingress replica holds FastAPI,
the tokenizer and the chat template, nothing more. Every call to a replica is bounded: it must
take a request (its stream's first item, `Accepted`) within ROUTE_TIMEOUT_S and answer a health
check within HEALTH_TIMEOUT_S, else the client gets 503 + Retry-After at once instead of waiting
while no replica is ready (one being replaced, scaling up, or one that cannot be placed).
Engine gauges reach /metrics through the stats board (stats_board.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayError, RayTaskError

from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.serving import errors
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.ray_serve.messages import RemoteError, ReplicaStream
from ernie_cluster.serving.ray_serve.stats_board import StatsBoardClient
from ernie_cluster.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

ROUTE_TIMEOUT_S = 5.0
"""Longest a request waits for a model replica to take it (then 503 + Retry-After)."""
HEALTH_TIMEOUT_S = 5.0
"""Longest /health waits for a model replica's answer."""


class ServeEngineClient:
    """EngineClient over a DeploymentHandle to the LLMServer deployment. Its streams are
    `ReplicaStream`s: once the first output arrived, `replica` names the replica serving it."""

    def __init__(
        self,
        handle,
        board: StatsBoardClient,
        route_timeout_s: float = ROUTE_TIMEOUT_S,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
    ) -> None:
        self.handle = handle
        self.board = board
        self.route_timeout_s = route_timeout_s
        self.health_timeout_s = health_timeout_s

    def generate(self, request: EngineRequest, session_key: str | None = None) -> ReplicaStream:
        return ReplicaStream(self._call("generate", request, session_key))

    def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> ReplicaStream:
        return ReplicaStream(self._call("generate_batch", requests, session_key))

    async def _call(self, method: str, payload, session_key: str | None) -> AsyncIterator:
        """Stream `method` of a model replica: its first item (Accepted) within the route
        timeout, then its items, errors re-raised as the OpenAI errors they were."""
        handle = self.handle.options(stream=True)
        stream = getattr(handle, method).remote(payload, session_key=session_key)
        try:
            try:
                first = await asyncio.wait_for(stream.__anext__(), self.route_timeout_s)
            except asyncio.TimeoutError:
                raise errors.EngineUnavailableError(
                    f"no model replica took the request within {self.route_timeout_s:g} s "
                    "(all are full, or none is ready: starting, being replaced or not placed)"
                ) from None
            # NOTE: the Accepted goes through to the ReplicaStream, which reads the replica
            # off it (a replica of an older version, during an upgrade, sends none).
            async for item in chain_first(first, stream):
                if isinstance(item, RemoteError):
                    raise item.to_exception()
                yield item
        except RayError as exc:
            raise replica_failure(exc) from exc
        finally:
            stream.cancel()  # a client that went away aborts the request in the replica

    async def check_health(self) -> None:
        response = self.handle.health.remote()
        try:
            result = await asyncio.wait_for(response, self.health_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise errors.EngineUnavailableError(
                f"no model replica answered within {self.health_timeout_s:g} s "
                "(all are busy, or none is ready: starting, being replaced or not placed)"
            ) from None
        except Exception as exc:
            raise errors.EngineUnavailableError(f"model replica unreachable: {exc}") from exc
        if result is not None:
            raise result.to_exception()

    async def get_stats(self) -> list[dict[str, Any]]:
        return await self.board.read()


async def chain_first(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def replica_failure(exc: RayError) -> errors.OpenAIError:
    """The OpenAI error for a failed call to a replica: 500 when its code raised, 503 when the
    replica died or could not be reached. (A replica reports its engine's and shard workers'
    failures as RemoteErrors, 503s: see model_server.remote_error.)"""
    if isinstance(exc, RayTaskError):
        logger.error("model replica failed: %s", exc)
        return errors.OpenAIError(f"generation failed: {type(exc.cause).__name__}")
    return errors.EngineUnavailableError(f"the model replica serving the request failed: {exc}")


class OpenAIIngress:
    """The HTTP entry: validation, chat template, tokenization, routing to model replicas."""

    def __init__(self, llm_handle, app_config: dict, model: str, board_name: str) -> None:
        from ernie_cluster.serving.ray_serve.config import ServeAppConfig

        config = ServeAppConfig.model_validate(app_config)
        settings = ingress_settings(config, model)
        # NOTE: created here, held for the ingress's life: the board lives as long as we do.
        self.board = StatsBoardClient(board_name, create=True)
        self.board.connect()
        self.serving = OpenAIServing(ServeEngineClient(llm_handle, self.board), settings)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.serving)


def ingress_settings(config, model: str) -> ServingSettings:
    """What the ingress needs of the checkpoint: tokenizer, template, limits (no weights)."""
    from ernie_cluster.loader.checkpoint_files import resolve_model_path

    model_dir = resolve_model_path(model, config.revision, include_weights=False)
    return ServingSettings.from_checkpoint(
        model_dir,
        config.served_model_names(),
        config.max_model_len,
        reasoning_parser=config.reasoning_parser,
        tool_call_parser=config.tool_call_parser,
        api_key=config.api_key,
        auth_all_routes=config.api_key_all_routes,
        max_request_body_bytes=config.max_request_body_bytes,
        limits=config.limits,
    )
