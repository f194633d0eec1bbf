"""The Ray Serve model replicas: LLMServer (one replica = one model instance with its W shard
workers) and OpenAIServer (the single-hop layout: the HTTP app and the model in one replica).

Every stream a replica answers starts with `Accepted` (naming the replica), and every error it
raises goes back as a `RemoteError` (messages.py), so the ingress re-raises exactly the OpenAI
error meant and never unpickles an engine type. Engine gauges go to the stats board every
STATS_PERIOD_S.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ernie_cluster.engine.async_engine import AsyncLLMEngine, EngineDeadError
from ernie_cluster.executor import WorkerDiedError, make_executor
from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import RequestOutput
from ernie_cluster.serving import errors
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.local_engine_client import LocalEngineClient, engine_stats_dict
from ernie_cluster.serving.ray_serve.ingress import ingress_settings
from ernie_cluster.serving.ray_serve.messages import Accepted, RemoteError, ReplicaStream
from ernie_cluster.serving.ray_serve.stats_board import StatsBoardClient

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 2.0
STATS_TIMEOUT_S = 5.0
"""Longest one stats read may take (the shard workers' expert counters)."""


def remote_error(exc: Exception) -> RemoteError:
    """What the ingress should raise for `exc`, as data: 503 when the engine or its shard
    workers failed, the OpenAI error itself, a 400 for a ValueError, else a 500."""
    if isinstance(exc, WorkerDiedError | EngineDeadError):
        exc = errors.EngineUnavailableError(f"the model replica's shard workers failed: {exc}")
    elif not isinstance(exc, errors.OpenAIError | ValueError):
        logger.exception("model replica failed")
        exc = errors.OpenAIError(f"generation failed: {type(exc).__name__}")
    return RemoteError.from_exception(exc)


class LLMServer:
    """One model instance: AsyncLLMEngine plus its executor (Ray actors when W > 1)."""

    creates_board = False
    """The ingress creates (and keeps) the stats board; model replicas only post to it."""

    async def __init__(
        self,
        engine_config,
        max_waiting_requests: int | None,
        board_name: str,
        placement_strategy: str = "STRICT_PACK",
        cpus_per_worker: int = 1,
    ) -> None:
        from ernie_cluster.engine.llm_engine import LLMEngine

        executor_factory = functools.partial(
            make_executor, placement_strategy=placement_strategy, cpus_per_worker=cpus_per_worker
        )
        self.engine = AsyncLLMEngine(LLMEngine(engine_config, executor_factory))
        self.client = LocalEngineClient(self.engine, max_waiting_requests)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica = "local"
        self.board = StatsBoardClient(board_name, create=self.creates_board)
        self._publisher = asyncio.get_running_loop().create_task(self._publish_stats())

    async def _publish_stats(self) -> None:
        while True:
            try:
                # NOTE: off the event loop and bounded: the expert counters come from the
                # shard workers, and a hung worker must not stall the requests here.
                stats = await asyncio.wait_for(asyncio.to_thread(self.stats), STATS_TIMEOUT_S)
                await self.board.post(self.replica, stats)
            except Exception as exc:  # the board is best effort: never break serving
                logger.debug("stats publish failed: %s", exc)
            await asyncio.sleep(STATS_PERIOD_S)

    def stats(self) -> dict[str, Any]:
        """This replica's engine gauges (also pushed to the stats board every 2 s)."""
        return engine_stats_dict(self.engine, self.replica)

    async def shard_pids(self) -> list[int]:
        """Process ids of this replica's shard workers, rank order (operators, chaos tests)."""
        return await asyncio.to_thread(self.engine.engine.executor.worker_pids)

    async def generate(
        self, request: EngineRequest, session_key: str | None = None
    ) -> AsyncIterator[Accepted | RequestOutput | RemoteError]:
        yield Accepted(self.replica)
        try:
            async for output in self.client.generate(request):
                yield output
        except Exception as exc:
            yield remote_error(exc)

    async def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[Accepted | tuple[int, RequestOutput] | RemoteError]:
        """Every prompt of one batched completion, in one call: one Serve request per HTTP
        request (Serve files a caller's calls by its request id, so one call per prompt
        would be dropped as duplicates)."""
        yield Accepted(self.replica)
        try:
            async for item in self.client.generate_batch(requests):
                yield item
        except Exception as exc:
            yield remote_error(exc)

    async def check_health(self) -> None:
        """Serve's health hook: a dead engine makes Serve replace this replica."""
        await self.client.check_health()

    async def health(self) -> RemoteError | None:
        try:
            await self.client.check_health()
        except errors.OpenAIError as exc:
            return RemoteError.from_exception(exc)
        return None


class ReplicaEngineClient(LocalEngineClient):
    """The engine of this very replica (single-hop layout), stats from every replica; its
    streams name this replica as the ingress's do."""

    def __init__(self, server: LLMServer) -> None:
        super().__init__(server.engine, server.client.max_waiting_requests)
        self.server = server

    def generate(self, request: EngineRequest, session_key: str | None = None) -> ReplicaStream:
        return ReplicaStream(super().generate(request), self.server.replica)

    def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> ReplicaStream:
        return ReplicaStream(super().generate_batch(requests), self.server.replica)

    async def get_stats(self) -> list[dict[str, Any]]:
        return await self.server.board.read()


class OpenAIServer(LLMServer):
    """Single-hop layout: the HTTP app and the model instance in one replica.

    One Serve hop instead of two (about 6 ms less to the first token on a 2-core machine);
    the proxy spreads requests over replicas by load, so there is no session affinity.
    """

    creates_board = True  # no ingress here to hold it

    async def __init__(
        self,
        engine_config,
        max_waiting_requests,
        board_name,
        placement_strategy,
        cpus_per_worker,
        app_config: dict,
        model: str,
    ) -> None:
        from ernie_cluster.serving.ray_serve.config import ServeAppConfig

        await LLMServer.__init__(
            self,
            engine_config,
            max_waiting_requests,
            board_name,
            placement_strategy,
            cpus_per_worker,
        )
        settings = ingress_settings(ServeAppConfig.model_validate(app_config), model)
        self.serving = OpenAIServing(ReplicaEngineClient(self), settings)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.serving)
