"""LocalEngineClient: the EngineClient over an AsyncLLMEngine in this process (the Ray Serve
model replica, `serve --no-ray-serve`, tests), with a bound on waiting requests, and the
engine's gauges as the dict /metrics reads. Maps engine exceptions to OpenAI errors here, so
nothing above it needs to know the engine's types.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ernie_cluster.engine.async_engine import AsyncLLMEngine, EngineDeadError
from ernie_cluster.engine.llm_engine import BatchFailedError
from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import RequestOutput
from ernie_cluster.serving.errors import (
    BadRequestError,
    EngineUnavailableError,
    OpenAIError,
    OverloadedError,
)
from ernie_cluster.structured_output.compiler import GrammarBusyError


def engine_stats_dict(engine: AsyncLLMEngine, replica: str = "local") -> dict[str, Any]:
    stats = engine.get_stats()
    values = {k: v for k, v in asdict(stats).items() if k != "expert_tokens_per_layer"}
    spec = values.pop("spec_decode")
    if spec is not None:
        values.update(
            {f"spec_decode_{k}": v for k, v in spec.items() if k != "accepted_per_position"}
        )
        values["spec_decode_acceptance_rate"] = stats.spec_decode.acceptance_rate
        values["spec_decode_mean_accepted_length"] = stats.spec_decode.mean_accepted_length
    values["expert_load_imbalance"] = stats.expert_load_imbalance
    values["kv_cache_usage"] = stats.kv_blocks_used / max(1, stats.kv_blocks_total)
    values["replica"] = replica
    return values


class LocalEngineClient:
    """An AsyncLLMEngine in this process, with a bound on waiting requests."""

    def __init__(self, engine: AsyncLLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests

    def check_admission(self, num_sequences: int = 1) -> None:
        """Turn work away when, with its `num_sequences` added, more than
        `max_waiting_requests` sequences would queue beyond the free batch slots (an idle
        engine takes a burst of max_num_seqs + max_waiting_requests sequences). Sequences,
        not requests, are counted: one n=128 request is 128 sequences of work."""
        if self.max_waiting_requests is None:
            return
        capacity = self.engine.engine.config.max_num_seqs + self.max_waiting_requests
        if num_sequences > capacity:
            raise BadRequestError(
                f"the request asks for {num_sequences} sequences (n x prompts); this server "
                f"admits at most {capacity} at once (max_num_seqs + --max-waiting-requests)",
                param="n",
            )
        queued = self.engine.num_queued_after(num_sequences)
        if queued > self.max_waiting_requests:
            raise OverloadedError(
                f"the server is at capacity: {queued} sequences would queue beyond the running "
                f"batch (--max-waiting-requests {self.max_waiting_requests}); retry shortly"
            )

    async def generate(
        self, request: EngineRequest, session_key: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        async for _, output in self.generate_batch([request], session_key):
            yield output

    async def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        # NOTE: nothing awaits between the admission check and the engine counting these
        # sequences as waiting, so a burst cannot slip past the check together.
        self.check_admission(sum(request.params.n for request in requests))
        try:
            async for item in self.engine.generate_requests(requests):
                yield item
        except EngineDeadError as exc:
            raise EngineUnavailableError(str(exc)) from exc
        except BatchFailedError as exc:
            raise OpenAIError(str(exc), code="generation_failed") from exc
        except GrammarBusyError as exc:  # other compiles fill the pool: a moment's load
            raise OverloadedError(str(exc), retry_after_s=exc.retry_after_s) from exc

    async def check_health(self) -> None:
        try:
            # NOTE: off the event loop: pinging shard workers may take up to their timeout.
            await asyncio.to_thread(self.engine.check_health)
        except Exception as exc:
            raise EngineUnavailableError(f"engine unhealthy: {exc}") from exc

    async def get_stats(self) -> list[dict[str, Any]]:
        return [engine_stats_dict(self.engine)]
