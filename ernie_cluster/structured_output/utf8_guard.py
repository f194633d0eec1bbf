"""Keeps byte-fallback tokens from spelling invalid UTF-8 inside constrained text.

xgrammar 0.2.9 checks most of UTF-8 byte by byte but lets through a few sequences no decoder
accepts: surrogates (0xED then 0xA0-0xBF) everywhere, and overlong or out-of-range forms
(0xE0 then 0x80-0x9F, 0xF0 then 0x80-0x8F, 0xF4 then 0x90-0xBF) inside patterns. A model that
emits one gets U+FFFD in its text, which can break a schema's lengths or patterns. After a
lead byte token, this guard clears the byte tokens that cannot follow it.
"""

from __future__ import annotations

import torch

from ernie_cluster.tokenizer import Tokenizer

# Lead byte -> the continuation bytes that make an invalid sequence after it.
_INVALID_NEXT = {
    0xE0: range(0x80, 0xA0),
    0xED: range(0xA0, 0xC0),
    0xF0: range(0x80, 0x90),
    0xF4: range(0x90, 0xC0),
}


class Utf8Guard:
    """Per-vocabulary tables of byte tokens; empty (a no-op) for byte-level vocabularies."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)}
        self.byte_of_token = {token: b for b, token in ids.items() if token is not None}
        self._banned: dict[int, list[int]] = {}
        for lead, invalid in _INVALID_NEXT.items():
            tokens = [ids[b] for b in invalid if ids.get(b) is not None]
            if ids.get(lead) is not None and tokens:
                self._banned[ids[lead]] = tokens

    def banned_after(self, token: int | None) -> list[int]:
        """Byte tokens that may not follow `token` (the sequence's last generated token)."""
        return self._banned.get(token, []) if token is not None else []

    @staticmethod
    def clear(bitmask: torch.Tensor, row: int, tokens: list[int]) -> None:
        """Disallow `tokens` in row `row` of an xgrammar bitmask [G, W] int32."""
        for token in tokens:
            word, bit = divmod(token, 32)
            bitmask[row, word] &= ~(1 << bit) if bit < 31 else 0x7FFFFFFF
