"""What the HTTP layer needs from a model instance: the `EngineClient` protocol.

`EngineClient` is the seam between serving and the engine: the Ray Serve ingress implements it
over a DeploymentHandle (ray_serve/ingress.py), tests implement it with scripted engines, and
`LocalEngineClient` (local_engine_client.py) runs an AsyncLLMEngine in the same process.
Clients take `EngineRequest`s (built by the input processor in the HTTP layer) and stream
RequestOutput deltas. Never imports the engine: the HTTP ingress imports this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ernie_cluster.inputs.engine_request import EngineRequest
from ernie_cluster.outputs import RequestOutput


class EngineClient(Protocol):
    """Streams may name the model replica serving them: a `replica` attribute, set once the
    first item has arrived (the HTTP layer sends it as the x-ernie-replica header)."""

    def generate(
        self, request: EngineRequest, session_key: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas; raises OverloadedError / EngineUnavailableError / ValueError."""
        ...

    def generate_batch(
        self, requests: list[EngineRequest], session_key: str | None = None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several requests as one call (a batched /v1/completions): admitted together or
        refused together, their deltas merged as (index in `requests`, delta)."""
        ...

    async def check_health(self) -> None:
        """Raises EngineUnavailableError unless the engine is stepping."""
        ...

    async def get_stats(self) -> list[dict[str, Any]]:
        """One dict of engine gauges per model replica this client can see."""
        ...
