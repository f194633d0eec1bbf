"""Per-step attention metadata for a flat batch of tokens over a paged KV cache.

Built once per step from each sequence's (number of new tokens, total context length, block
table) and shared by every layer. Holds index tensors only; never model activations.

Layout: the step's tokens are the concatenation of each sequence's new tokens. Sequences
with one new token (decodes) are attended in one padded batch; sequences with several new
tokens (prefill chunks) are attended one at a time with a causal mask offset by their cached
prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PrefillSpan:
    """One sequence with several new tokens: rows [start, stop) of the flat batch."""

    start: int
    stop: int
    key_slots: torch.Tensor  # [context_len] cache slots of every key the span attends to
    mask: torch.Tensor | None  # [num_new, context_len] True where query may attend to key;
    # None when the span has no cached prefix: plain causal attention, no mask to build


@dataclass
class AttentionMetadata:
    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] cache slot for each new token's K/V
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor  # [num_decodes] flat row of each decode token
    decode_key_slots: torch.Tensor  # [num_decodes, max_context] (0-padded)
    decode_mask: torch.Tensor  # [num_decodes, max_context] True for real keys

    @property
    def num_decodes(self) -> int:
        return int(self.decode_rows.numel())

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """`context_lens[i]` counts sequence i's tokens including this step's new ones."""
        if not len(query_lens) == len(context_lens) == len(block_tables):
            raise ValueError(
                f"query_lens ({len(query_lens)}), context_lens ({len(context_lens)}) and "
                f"block_tables ({len(block_tables)}) must have one entry per sequence"
            )
        slot_chunks: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        row = 0
        for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 0 < q_len <= ctx_len or len(table) * block_size < ctx_len:
                raise ValueError(
                    f"bad sequence: {q_len} new tokens, context {ctx_len}, "
                    f"{len(table)} blocks of {block_size}"
                )
            positions = torch.arange(ctx_len, dtype=torch.long)
            blocks = torch.as_tensor(list(table), dtype=torch.long)
            slots = blocks[positions // block_size] * block_size + positions % block_size
            slot_chunks.append(slots[ctx_len - q_len :])
            if q_len == 1:
                decode_rows.append(row)
                decode_slots.append(slots)
            else:
                mask = None
                if q_len < ctx_len:
                    query_pos = torch.arange(ctx_len - q_len, ctx_len)[:, None]
                    mask = (positions[None, :] <= query_pos).to(device)  # [q_len, ctx_len]
                prefills.append(PrefillSpan(row, row + q_len, slots.to(device), mask))
            row += q_len

        max_ctx = max((s.numel() for s in decode_slots), default=0)
        key_slots = torch.zeros(len(decode_slots), max_ctx, dtype=torch.long)
        key_mask = torch.zeros(len(decode_slots), max_ctx, dtype=torch.bool)
        for i, slots in enumerate(decode_slots):
            key_slots[i, : slots.numel()] = slots
            key_mask[i, : slots.numel()] = True
        slot_mapping = torch.cat(slot_chunks) if slot_chunks else torch.zeros(0, dtype=torch.long)
        return cls(
            num_tokens=row,
            slot_mapping=slot_mapping.to(device),
            prefills=prefills,
            decode_rows=torch.as_tensor(decode_rows, dtype=torch.long, device=device),
            decode_key_slots=key_slots.to(device),
            decode_mask=key_mask.to(device),
        )
