"""The one rule for what leaves the event loop: planning a request with a large body.

A request whose body is over OFF_LOOP_BODY_BYTES is planned (chat template, tokenization,
constraint validation and grammar building, id checks, detokenizing id prompts) on a worker
thread, so /health and small requests keep their latency meanwhile. A large prompt text, a long
list of token ids and a large constraint all make a large body, so one test covers them. Small
bodies stay on the loop: a thread hop costs more than their planning. Cheap checks (counts,
lengths, `RequestLimits`) run before, on the loop.

NOTE: decoding the JSON body and pydantic's validation stay on the loop: both are C/Rust calls
that hold the GIL throughout, so a thread would block the loop just as long (measured: 5 MB of
token ids, 0.32 s decode, 0.32 s worst loop gap from a thread). The body limit bounds them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

OFF_LOOP_BODY_BYTES = 32 * 1024
"""Requests with bodies larger than this are planned on a worker thread."""

T = TypeVar("T")


def is_large(body_bytes: int) -> bool:
    return body_bytes > OFF_LOOP_BODY_BYTES


async def plan_request(plan: Callable[[], T], body_bytes: int) -> T:
    """`plan()`, on a worker thread when the request's body is large."""
    if is_large(body_bytes):
        return await asyncio.to_thread(plan)
    return plan()
