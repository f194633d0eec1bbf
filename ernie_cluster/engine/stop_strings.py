"""Stop-string matching whose cost does not grow with the number of stop strings.

A request's stop strings are indexed once (one dict, built on first use and shared by its n
sequences); each new token then looks up only the windows of text that end in its new
characters, one per distinct stop length. Per new character that is at most `len(lengths)`
dict lookups of at most `max_len` characters, whether the request has 1 or 100,000 strings.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """One request's stop strings. Matches exactly as a `str.find` per string would: the
    earliest occurrence that ends in the new text wins, ties going to the string listed
    first."""

    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or not all(stops):
            raise ValueError(f"stop strings must be non-empty; got {len(stops)} strings")
        self.stops = stops
        self.max_len = max(map(len, stops))
        self._index: dict[str, int] | None = None
        self._lengths: list[int] = []

    @property
    def holdback(self) -> int:
        """Characters a stream holds back: the longest proper prefix a stop string can
        have at the end of the text."""
        return self.max_len - 1

    def _build(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for position, stop in enumerate(self.stops):
            index.setdefault(stop, position)  # a repeated string keeps its first position
        self._lengths = sorted({len(stop) for stop in index})
        self._index = index
        return index

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """The earliest (position, stop string) of an occurrence in `text` that ends after
        `new_from` (the length of the text already checked); None when there is none."""
        index = self._index if self._index is not None else self._build()
        lengths = self._lengths
        best: tuple[int, int] | None = None  # (start, position in the stop list)
        for end in range(new_from + 1, len(text) + 1):
            if best is not None and end - self.max_len > best[0]:
                break  # every later window starts after the best match
            for length in lengths:
                start = end - length
                if start < 0:
                    break  # lengths ascend: the rest start before the text
                found = index.get(text[start:end])
                if found is not None and (best is None or (start, found) < best):
                    best = (start, found)
        return None if best is None else (best[0], self.stops[best[1]])

    def cut(self, text: str, delta: str, include_stop: bool) -> tuple[str, str] | None:
        """`text + delta` cut at the earliest stop string that ends in `delta` (kept when
        `include_stop`), and that string; None when no stop string ends in `delta`."""
        keep = min(len(text), self.max_len - 1)  # older text can only start a match
        tail = text[len(text) - keep :] + delta
        found = self.find(tail, keep)
        if found is None:
            return None
        start, stop = found
        start += len(text) - keep
        full = text + delta
        return (full[: start + len(stop)] if include_stop else full[:start]), stop


def cut_per_string(
    text: str, delta: str, stops: Sequence[str], include_stop: bool
) -> tuple[str, str] | None:
    """`StopStrings.cut` by one `str.find` per stop string: the reference the matcher is
    tested against (and what every token ran before it, count x n finds per token)."""
    full = text + delta
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = full.find(stop, max(0, len(text) - len(stop) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return None
    pos, stop = best
    return (full[: pos + len(stop)] if include_stop else full[:pos]), stop
