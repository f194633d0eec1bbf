"""Streaming detokenization: turning generated token ids into text deltas as they arrive.

Owns the one rule streaming must keep: the deltas of a request concatenate to exactly
`tokenizer.decode(output_ids)`, and a delta never ends in half a character. Each step decodes
only the tokens not yet turned into text, so a step costs O(held-back tokens), not O(output).
"""

from __future__ import annotations

from collections.abc import Sequence

from ernie_cluster.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

REPLACEMENT_CHAR = "\ufffd"
# An unfinished run of byte tokens is held back whole (see the class docstring) up to this
# many tokens; past it, streaming stays bounded and falls back to whole-character release.
MAX_HELD_BYTE_RUN = 128
# For decoders that render a cut character as U+FFFD: text still ending in U+FFFD after this
# many held-back tokens is invalid UTF-8 (a character is at most 4 bytes) and is released.
MAX_HELD_TOKENS = 8
# Tokens tried, in order, as the decode anchor: a plain piece that decodes to itself.
_ANCHOR_CANDIDATES = ("a", "e", "A", "0", ".", "x", "!")


class IncrementalDetokenizer:
    """Text of one request's output ids, released piece by piece.

    Three rules make the deltas add up to decode(output ids):
    - Context. Before the first visible character, text is decoded from the output's start,
      so a tokenizer that strips a leading space strips it here too. After that, pending
      tokens are decoded behind a fixed anchor token (`decode([anchor] + pending)` minus the
      anchor's text): their mid-sequence text, a leading "▁" staying a space even right after
      a skipped special token.
    - Byte runs. A byte-fallback decoder turns a run of <0xNN> tokens into text as a whole,
      and one invalid byte makes the whole run U+FFFD, so a run is held back until a visible
      non-byte token ends it (or flush()). Tokens that decode to nothing (skipped special
      tokens, ids past the vocabulary) do not end a run, as in decode().
    - Cut characters. Text that still ends in U+FFFD is held back a few tokens.

    prompt_token_ids is accepted so a request can be handed over as is, but the text never
    depends on it: the contract is the decode of the output ids alone (ERNIE's tokenizer adds
    no dummy-prefix space, so the prompt could not change that text anyway).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._anchor_id, self._anchor_text = _find_anchor(tokenizer)
        self._byte_ids = tokenizer.byte_token_ids
        self._silent_ids = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._vocab_size = tokenizer.vocab_size
        self._output_ids: list[int] = []
        self._pending_start = 0  # index of the first output token not yet released
        self._run_start: int | None = None  # index where an unfinished byte run starts
        self._started = False  # whether any visible text has been released
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text released so far (held-back tokens are not in it)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; returns the newly finished text (may be empty)."""
        bad = [i for i in new_token_ids if not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"token ids must be non-negative ints, got {bad[:8]}")
        for token_id in new_token_ids:
            if token_id in self._byte_ids:
                if self._run_start is None:
                    self._run_start = len(self._output_ids)
            elif token_id not in self._silent_ids and token_id < self._vocab_size:
                self._run_start = None
            self._output_ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the request: release held-back text even if a character is cut."""
        self._run_start = None
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._output_ids)
        if self._run_start is not None and end - self._run_start <= MAX_HELD_BYTE_RUN:
            end = max(self._run_start, self._pending_start)
        ready = self._output_ids[self._pending_start : end]
        if not ready:
            return ""
        if final:
            cut, text = len(ready), self._decode_pending(ready)
        else:
            cut, text = self._complete_prefix(ready)
        if not self._started:
            if not text and self._decode_in_context(ready[:cut]):
                # Text that decode() strips at the start (a lone leading "▁"): keep those
                # tokens pending so the strip still applies once visible text follows.
                return ""
            self._started = bool(text)
        self._pending_start += cut
        if text:
            self._chunks.append(text)
        return text

    def _complete_prefix(self, ready: list[int]) -> tuple[int, str]:
        """How many of the ready tokens can be released now, and their text."""
        text = self._decode_pending(ready)
        if not text.endswith(REPLACEMENT_CHAR):
            return len(ready), text
        # Hold back the shortest tail that leaves whole characters in front of it.
        for num_held in range(1, min(len(ready), MAX_HELD_TOKENS + 1)):
            head = self._decode_pending(ready[:-num_held])
            if not head.endswith(REPLACEMENT_CHAR):
                return len(ready) - num_held, head
        if len(ready) > MAX_HELD_TOKENS:
            return len(ready), text  # invalid UTF-8: holding longer cannot fix it
        return 0, ""

    def _decode_pending(self, ids: list[int]) -> str:
        return self._decode_in_context(ids) if self._started else self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_in_context(self, ids: list[int]) -> str:
        return self._decode([self._anchor_id, *ids])[len(self._anchor_text) :]


def _find_anchor(tokenizer: Tokenizer) -> tuple[int, str]:
    """A token that decodes to the same non-space text alone and in front of any text."""
    for candidate in _ANCHOR_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is None or token_id in tokenizer.all_special_ids:
            continue
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if (
            text
            and not text[0].isspace()
            and tokenizer.decode([token_id, token_id], skip_special_tokens=False) == text * 2
        ):
            return token_id, text
    raise ValueError(
        f"tokenizer has none of the anchor tokens {_ANCHOR_CANDIDATES} that streaming "
        "detokenization needs"
    )
