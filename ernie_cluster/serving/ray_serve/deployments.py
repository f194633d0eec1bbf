"""The Ray Serve deployments: LLMServer (one replica = one model instance with its W shard
workers) and OpenAIIngress (the FastAPI app), plus the handle-based EngineClient between them.

Errors cross the handle as plain data (`RemoteError`) rather than pickled exceptions, so the
ingress re-raises exactly the OpenAI error the replica meant. Every call from the ingress to
a replica is bounded: a replica must take a request (its stream's first item, `Accepted`)
within ROUTE_TIMEOUT_S and answer a health check within HEALTH_TIMEOUT_S, else the client
gets 503 + Retry-After at once instead of waiting while no replica is ready (one being
replaced, scaling up, or one that cannot be placed). Engine gauges reach /metrics through the
stats board (stats_board.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayError, RayTaskError

from ernie_cluster.engine.async_engine import AsyncLLMEngine, EngineDeadError
from ernie_cluster.executor.ray_executor import WorkerDiedError
from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import RequestOutput
from ernie_cluster.serving import errors
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.engine_client import LocalEngineClient, engine_stats_dict
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.ray_serve.stats_board import StatsBoardClient
from ernie_cluster.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 2.0
STATS_TIMEOUT_S = 5.0
"""Longest one stats read may take (the shard workers' expert counters)."""
ROUTE_TIMEOUT_S = 5.0
"""Longest a request waits for a model replica to take it (then 503 + Retry-After)."""
HEALTH_TIMEOUT_S = 5.0
"""Longest /health waits for a model replica's answer."""


@dataclass
class Accepted:
    """First item of every LLMServer.generate stream: a replica has taken the request."""

    replica: str


@dataclass
class RemoteError:
    """An error raised in a model replica, carried back to the ingress as data."""

    kind: str  # an errors.OpenAIError subclass name, or "ValueError"
    message: str
    param: str | None = None
    retry_after_s: int = 1

    @classmethod
    def from_exception(cls, exc: BaseException) -> RemoteError:
        if isinstance(exc, errors.OpenAIError):
            retry_after = int(exc.headers.get("Retry-After", 1))
            return cls(type(exc).__name__, exc.message, exc.param, retry_after)
        return cls("ValueError", str(exc))

    def to_exception(self) -> Exception:
        if self.kind == "OverloadedError":
            return errors.OverloadedError(self.message, retry_after_s=self.retry_after_s)
        if self.kind == "EngineUnavailableError":
            return errors.EngineUnavailableError(self.message)
        if self.kind == "ValueError":
            return errors.BadRequestError(self.message)
        error_cls = getattr(errors, self.kind, errors.OpenAIError)
        return error_cls(self.message, param=self.param)


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

        def executor_factory(config, model_dir):
            if config.world_size == 1:
                from ernie_cluster.executor.local_executor import LocalExecutor

                return LocalExecutor(config, model_dir)
            from ernie_cluster.executor.ray_executor import RayExecutor

            return RayExecutor(
                config,
                model_dir,
                placement_strategy=placement_strategy,
                cpus_per_worker=cpus_per_worker,
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
        executor = self.engine.engine.executor
        if not hasattr(executor, "worker_pids"):
            return [os.getpid()]  # W = 1: the model runs in this process
        return await asyncio.to_thread(executor.worker_pids)

    async def generate(
        self, request: EngineRequest, session_key: str | None = None
    ) -> AsyncIterator[Accepted | RequestOutput | RemoteError]:
        yield Accepted(self.replica)
        try:
            async for output in self.client.generate(request):
                output.served_by = self.replica
                yield output
        except (errors.OpenAIError, ValueError) as exc:
            yield RemoteError.from_exception(exc)

    async def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[Accepted | tuple[int, RequestOutput] | RemoteError]:
        """Every prompt of one batched completion, in one call: one Serve request per HTTP
        request (Serve files a caller's calls by its request id, so one call per prompt
        would be dropped as duplicates)."""
        yield Accepted(self.replica)
        try:
            async for index, output in self.client.generate_batch(requests):
                output.served_by = self.replica
                yield index, output
        except (errors.OpenAIError, ValueError) as exc:
            yield RemoteError.from_exception(exc)

    async def check_health(self) -> None:
        """Serve's health hook: a dead engine makes Serve replace this replica."""
        await self.client.check_health()

    async def health(self) -> RemoteError | None:
        try:
            await self.client.check_health()
        except errors.OpenAIError as exc:
            return RemoteError.from_exception(exc)
        return None


class ServeEngineClient:
    """EngineClient over a DeploymentHandle to the LLMServer deployment."""

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

    def generate(
        self, request: EngineRequest, session_key: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        return self._call("generate", request, session_key)

    def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._call("generate_batch", requests, session_key)

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
            # NOTE: a replica of an older version (during an upgrade) sends no Accepted.
            items = stream if isinstance(first, Accepted) else chain_first(first, stream)
            async for item in items:
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
    """The OpenAI error for a failed call to a replica: 503 when the replica or its shard
    workers died or could not be reached, 500 when its code raised."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, WorkerDiedError | EngineDeadError):
        return errors.EngineUnavailableError(
            f"the model replica's shard workers failed: {exc.cause}"
        )
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


class ReplicaEngineClient(LocalEngineClient):
    """The engine of this very replica (single-hop layout), stats from every replica."""

    def __init__(self, server: LLMServer) -> None:
        super().__init__(server.engine, server.client.max_waiting_requests)
        self.server = server

    async def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        async for index, output in super().generate_batch(requests):
            output.served_by = self.server.replica
            yield index, output

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


def ingress_settings(config, model: str) -> ServingSettings:
    """What the ingress needs of the checkpoint: tokenizer, template, limits (no weights)."""
    from ernie_cluster.loader.checkpoint_files import resolve_model_path

    model_dir = resolve_model_path(model, config.revision, include_weights=False)
    return ServingSettings.from_checkpoint(
        model_dir,
        config.served_model_name or [config.model or "ernie-demo"],
        config.max_model_len,
        reasoning_parser=config.reasoning_parser,
        tool_call_parser=config.tool_call_parser,
        api_key=config.api_key,
        auth_all_routes=config.api_key_all_routes,
        max_request_body_bytes=config.max_request_body_bytes,
        limits=config.limits,
    )
