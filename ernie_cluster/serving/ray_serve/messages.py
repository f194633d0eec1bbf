"""What crosses the DeploymentHandle between the ingress and a model replica, besides requests
and RequestOutputs: `Accepted` (a stream's first item: which replica took the request) and
`RemoteError` (an error raised in the replica, as plain data), plus `ReplicaStream`, which reads
the `Accepted` off a stream so the HTTP layer can name the replica in its response.

Plain data only: unpickling these in the ingress must never import the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ernie_cluster.serving import errors


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


class ReplicaStream:
    """A model replica's stream whose first item may be `Accepted`: iterating yields the items
    after it, and `replica` names the replica once the first item has arrived (None when no
    `Accepted` came: an in-process engine, or a replica of an older version)."""

    def __init__(self, items: AsyncIterator[Any], replica: str | None = None) -> None:
        self._items = items
        self._first = True
        self.replica = replica

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> Any:
        item = await self._items.__anext__()
        if self._first:
            self._first = False
            if isinstance(item, Accepted):
                self.replica = item.replica
                item = await self._items.__anext__()
        return item

    async def aclose(self) -> None:
        close = getattr(self._items, "aclose", None)
        if close is not None:
            await close()
