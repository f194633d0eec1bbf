"""Session-affinity routing for the model replicas (a Ray Serve request router).

A request carrying a session key (x-session-id header, else the `user` field, else a hash of
the conversation's first messages) goes to the replica ranked first for that key by
rendezvous hashing, so a conversation's next turn lands where its KV prefix is cached; if that
replica is gone or full, the key's next-ranked replica takes it (only that key moves).
Requests without a key go to the least-loaded replica.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def affinity_score(session_key: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{session_key}|{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SessionAffinityRouter(RequestRouter):
    def _queue_len(self, replica: RunningReplica) -> int:
        cached = self._replica_queue_len_cache.get(replica.replica_id)
        return 0 if cached is None else cached

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("session_key") if pending_request else None
        by_load = sorted(candidate_replicas, key=self._queue_len)
        if not key:
            return [by_load]
        ranked = sorted(
            candidate_replicas,
            key=lambda r: affinity_score(key, r.replica_id.unique_id),
            reverse=True,
        )
        return [[ranked[0]], [r for r in by_load if r is not ranked[0]]]
