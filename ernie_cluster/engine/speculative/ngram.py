"""`ngram` proposals (prompt lookup): the tokens that followed the sequence's current suffix
the last time it occurred earlier in the same sequence (prompt or output)."""

from __future__ import annotations

from collections.abc import Sequence

from ernie_cluster.engine.speculative.token_index import TokenIndex


class NgramProposer:
    """Per-sequence indexes; the longest suffix match of `lookup_min`..`lookup_max` tokens
    wins, the most recent among equals."""

    def __init__(self, lookup_min: int, lookup_max: int) -> None:
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max
        self._indexes: dict[str, TokenIndex] = {}

    def extend(self, req_id: str, tokens: Sequence[int]) -> None:
        """Append the sequence's next tokens (prompt first, then outputs)."""
        index = self._indexes.get(req_id)
        if index is None:
            index = self._indexes[req_id] = TokenIndex(self.lookup_min)
        index.extend(req_id, tokens)

    def propose(self, req_id: str, num_tokens: int) -> list[int]:
        index = self._indexes[req_id]
        sequence = index.sequences[req_id]
        last = len(sequence) - 1
        best = None
        for match in index.matches(sequence, self.lookup_max, skip=(req_id, last)):
            if match.end == last:
                continue
            if best is None or match.length > best.length:
                best = match
                if best.length == self.lookup_max:
                    break
        if best is None:
            return []
        return sequence[best.end + 1 : best.end + 1 + num_tokens]

    def finish(self, req_id: str, outputs: Sequence[int]) -> None:
        """The request ended; prompt lookup never looks beyond a sequence."""
        self._indexes.pop(req_id, None)
