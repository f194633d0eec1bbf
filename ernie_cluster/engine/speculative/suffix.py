"""`suffix` proposals (suffix decoding): the continuation most often seen after the longest
match of the sequence's suffix, in its own tokens and in the outputs of recent requests.

Every occurrence of the longest matched suffix (up to `max_depth` tokens) is a candidate; the
proposal walks forward token by token, taking the next token most candidates agree on and
dropping the others, and stops when that token's share falls under `min_token_prob`, or after
`spec_factor` x (matched length) tokens, or k. Agent loops and repeated tool calls repeat
whole outputs of earlier requests, which the prompt-only `ngram` cannot see.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from ernie_cluster.engine.speculative.token_index import Match, TokenIndex

_ANCHOR = 2
"""Shortest suffix matched: one token alone matches too much to predict anything."""


class SuffixProposer:
    def __init__(
        self, max_depth: int, max_cached_requests: int, spec_factor: float, min_token_prob: float
    ) -> None:
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self.spec_factor = spec_factor
        self.min_token_prob = min_token_prob
        self._local: dict[str, TokenIndex] = {}
        self._cache = TokenIndex(_ANCHOR, max_candidates=256)
        self._cache_order: deque[tuple[str, int]] = deque()
        self._num_cached = 0

    def extend(self, req_id: str, tokens: Sequence[int]) -> None:
        """Append the sequence's next tokens (prompt first, then outputs)."""
        index = self._local.get(req_id)
        if index is None:
            index = self._local[req_id] = TokenIndex(_ANCHOR, max_candidates=256)
        index.extend(req_id, tokens)

    def propose(self, req_id: str, num_tokens: int) -> list[int]:
        local = self._local[req_id]
        context = local.sequences[req_id]
        last = len(context) - 1
        candidates = [
            m for m in local.matches(context, self.max_depth, skip=(req_id, last)) if m.end < last
        ]
        candidates += self._cache.matches(context, self.max_depth)
        if not candidates:
            return []
        longest = max(m.length for m in candidates)
        budget = min(num_tokens, int(self.spec_factor * longest))
        alive = [m for m in candidates if m.length == longest]
        proposal: list[int] = []
        for step in range(budget):
            following = [(m, self._token_after(m, step)) for m in alive]
            following = [(m, t) for m, t in following if t is not None]
            if not following:
                break
            # NOTE: Counter keeps first-seen order among equal counts: the most recent wins.
            token, count = Counter(t for _, t in following).most_common(1)[0]
            if count / len(following) < self.min_token_prob:
                break
            proposal.append(token)
            alive = [m for m, t in following if t == token]
        return proposal

    def _token_after(self, match: Match, step: int) -> int | None:
        index = self._local.get(match.key) or self._cache  # type: ignore[arg-type]
        sequence = index.sequences[match.key]
        position = match.end + 1 + step
        return sequence[position] if position < len(sequence) else None

    def finish(self, req_id: str, outputs: Sequence[int]) -> None:
        """The request ended with `outputs`: they join the cache other requests match against."""
        self._local.pop(req_id, None)
        if self.max_cached_requests == 0 or len(outputs) <= _ANCHOR:
            return
        key = ("done", self._num_cached)  # never a live request's id (a str)
        self._num_cached += 1
        self._cache.extend(key, list(outputs))
        self._cache_order.append(key)
        while len(self._cache_order) > self.max_cached_requests:
            self._cache.remove(self._cache_order.popleft())
