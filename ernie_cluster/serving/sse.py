"""Server-sent events framing and the first-item peek that lets a stream fail as a proper
HTTP error (before any byte is sent) instead of mid-stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TypeVar

from pydantic import BaseModel

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    """One event. Absent fields are left out, except a choice's `finish_reason`, which is
    null until the last chunk, as OpenAI sends it (clients read it on every chunk)."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json", exclude_none=True)
        for choice in payload.get("choices", ()):
            choice.setdefault("finish_reason", None)
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {body}\n\n"


class Peeked:
    """An async iterator that already holds its first item (None for an empty stream);
    `replica` is the model replica serving the stream, when its engine client names one
    (see EngineClient)."""

    def __init__(self, first, iterator) -> None:
        self.replica: str | None = getattr(iterator, "replica", None)
        self._gen = self._replay(first, iterator)

    @staticmethod
    async def _replay(first, iterator):
        try:
            if first is not None:
                yield first
                async for item in iterator:
                    yield item
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    def __aiter__(self):
        return self._gen

    async def __anext__(self):
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()


async def peeked(stream: AsyncIterator[T]) -> Peeked:
    """Await the first item now (so errors raise here), then stream everything."""
    iterator = stream.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None

    return Peeked(first, iterator)
