"""The stats board: a small named Ray actor where each model replica posts its engine gauges
and from which /metrics reads them (a DeploymentHandle cannot address every replica).

Who keeps it alive: a named actor that is not detached dies when its creator's process dies
or when no handle to it is left, so the creator must hold its handle. The ingress creates the
board and holds it for its whole life; model replicas only look it up (in the single-hop
layout, where there is no ingress, the replicas create it). A board that went away with its
creator is created again by the next process allowed to, and everyone's handle is refreshed
after a failed call. It never outlives the app's processes, so a deleted app leaves nothing.
Every call is bounded: the board is best effort and must never stall serving.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

logger = logging.getLogger(__name__)

NAMESPACE = "ernie-cluster"
STALE_S = 15.0
"""A replica that has not posted for this long is dropped (it died or was removed)."""
CALL_TIMEOUT_S = 2.0


@ray.remote(num_cpus=0)
class StatsBoard:
    """Latest engine gauges of each model replica (replicas post, the ingress reads)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, dict]] = {}

    def update(self, replica: str, stats: dict) -> None:
        self.entries[replica] = (time.time(), stats)

    def read(self) -> list[dict]:
        now = time.time()
        self.entries = {k: v for k, v in self.entries.items() if now - v[0] < STALE_S}
        return [stats for _, stats in self.entries.values()]


class StatsBoardClient:
    """One process's access to the app's board. `create`: this process may create the board
    (and then keeps it alive as long as it lives); otherwise it only finds an existing one."""

    def __init__(self, name: str, create: bool, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.name = name
        self.create = create
        self.timeout_s = timeout_s
        self._handle = None

    def connect(self):
        """The board's handle, created or looked up as this process may; None if absent."""
        if self._handle is None:
            if self.create:
                self._handle = StatsBoard.options(
                    name=self.name, namespace=NAMESPACE, get_if_exists=True
                ).remote()
            else:
                try:
                    self._handle = ray.get_actor(self.name, namespace=NAMESPACE)
                except ValueError:  # not created yet (or gone with its creator)
                    return None
        return self._handle

    async def post(self, replica: str, stats: dict) -> None:
        await self._call("update", replica, stats)

    async def read(self) -> list[dict]:
        """Every replica's latest gauges ([] when the board cannot be reached now)."""
        result = await self._call("read")
        return result if result is not None else []

    async def _call(self, method: str, *args):
        try:
            handle = self.connect()
            if handle is None:
                return None
            ref = getattr(handle, method).remote(*args)
            return await asyncio.wait_for(ref, self.timeout_s)
        except asyncio.TimeoutError:  # busy: keep the handle (dropping it could end the board)
            logger.debug("stats board %s.%s timed out", self.name, method)
            return None
        except Exception as exc:  # gone with its creator: find (or create) it again next time
            logger.debug("stats board %s.%s failed: %r", self.name, method, exc)
            self._handle = None
            return None
