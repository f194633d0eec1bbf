"""Small text helpers for incremental parsing: how much of a buffer's tail might still grow into
a tag, and how loose answer text loses its outer whitespace when it arrives in pieces.

Both give the same result however the text is split, which is what lets streamed deltas add up
to the whole-output parse.
"""

from __future__ import annotations

from collections.abc import Sequence


def held_suffix_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of one of `tags` (0 if none)."""
    longest = min(len(text), max(len(tag) for tag in tags) - 1)
    for length in range(longest, 0, -1):
        tail = text[-length:]
        if any(tag.startswith(tail) for tag in tags):
            return length
    return 0


class ContentJoiner:
    """Joins answer pieces into content, trimming whitespace only where it is loose text.

    Loose text (between blocks, or a block kept raw) loses its whitespace at the two ends of the
    whole content; verbatim text (a `<response>` body) is kept exactly. Trailing whitespace is
    held until something follows it, and dropped if nothing does.
    """

    def __init__(self) -> None:
        self._started = False
        self._pending_ws = ""

    def loose(self, text: str) -> str:
        """Content to emit now for loose `text`."""
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            if self._started:
                self._pending_ws += text
            return ""
        out = self._pending_ws + body
        self._pending_ws = text[len(body) :]
        self._started = True
        return out

    def verbatim(self, text: str) -> str:
        """Content to emit now for verbatim `text`."""
        if not text:
            return ""
        out = self._pending_ws + text
        self._pending_ws = ""
        self._started = True
        return out
