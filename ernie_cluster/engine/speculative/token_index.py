"""An index of token sequences by short windows, for finding where a context's suffix occurred.

Each sequence is stored once; every window of `anchor` consecutive tokens maps to the
positions where it ends. A lookup takes the context's last `anchor` tokens, visits their most
recent occurrences and extends each match backwards, so the cost per lookup is bounded by
`max_candidates` x the longest match tried, whatever the sequences' lengths; appending a token
costs one dictionary insert.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Match:
    key: Hashable
    """The sequence the match lies in."""
    end: int
    """Index in that sequence of the token matching the context's last one."""
    length: int
    """Tokens matched, counting back from `end` (at least the anchor)."""


class TokenIndex:
    def __init__(self, anchor: int, max_candidates: int = 64) -> None:
        if anchor < 1:
            raise ValueError(f"anchor must be >= 1, got {anchor}")
        self.anchor = anchor
        self.max_candidates = max_candidates
        self.sequences: dict[Hashable, list[int]] = {}
        self._ends: dict[tuple[int, ...], deque[tuple[Hashable, int]]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def extend(self, key: Hashable, tokens: Sequence[int]) -> None:
        """Append `tokens` to sequence `key` (created when new) and index the new windows."""
        sequence = self.sequences.setdefault(key, [])
        start = len(sequence)
        sequence.extend(tokens)
        for end in range(max(start, self.anchor - 1), len(sequence)):
            window = tuple(sequence[end - self.anchor + 1 : end + 1])
            self._ends.setdefault(window, deque()).append((key, end))

    def remove(self, key: Hashable) -> None:
        """Forget sequence `key` and its windows."""
        sequence = self.sequences.pop(key, None)
        if sequence is None:
            return
        for end in range(self.anchor - 1, len(sequence)):
            window = tuple(sequence[end - self.anchor + 1 : end + 1])
            ends = self._ends.get(window)
            if ends is None:
                continue
            # NOTE: the oldest sequence goes first (the suffix cache's order): its entries
            # lead each list, so this is usually a few pops, not a scan.
            while ends and ends[0][0] == key:
                ends.popleft()
            if any(entry[0] == key for entry in ends):
                kept = [entry for entry in ends if entry[0] != key]
                ends.clear()
                ends.extend(kept)
            if not ends:
                del self._ends[window]

    def matches(
        self, context: Sequence[int], max_length: int, skip: tuple[Hashable, int] | None = None
    ) -> list[Match]:
        """Occurrences of the context's suffix, most recent first (at most `max_candidates`),
        each with how far it matches backwards (capped at `max_length`). `skip`: an
        occurrence to leave out (the context's own end when it is indexed)."""
        if len(context) < self.anchor:
            return []
        ends = self._ends.get(tuple(context[len(context) - self.anchor :]))
        if not ends:
            return []
        found = []
        for key, end in reversed(ends):
            if (key, end) == skip:
                continue
            sequence = self.sequences[key]
            length = self.anchor
            limit = min(max_length, end + 1, len(context))
            while length < limit and sequence[end - length] == context[len(context) - 1 - length]:
                length += 1
            found.append(Match(key, end, length))
            if len(found) == self.max_candidates:
                break
        return found
