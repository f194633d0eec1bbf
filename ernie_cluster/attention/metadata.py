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
        num_seqs = len(query_lens)
        for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 0 < q_len <= ctx_len or len(table) * block_size < ctx_len:
                raise ValueError(
                    f"bad sequence: {q_len} new tokens, context {ctx_len}, "
                    f"{len(table)} blocks of {block_size}"
                )
        # NOTE: vectorised over the batch: with hundreds of decodes a per-sequence loop of
        # small tensor ops cost more than the scheduler.
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = torch.zeros(num_seqs, max_blocks, dtype=torch.long)  # [B, max_blocks]
        for i, table in enumerate(block_tables):
            padded[i, : len(table)] = torch.as_tensor(table, dtype=torch.long)
        q_lens = torch.as_tensor(query_lens, dtype=torch.long)
        ctx_lens = torch.as_tensor(context_lens, dtype=torch.long)
        starts = torch.cumsum(q_lens, 0) - q_lens  # [B] first row of each sequence
        row = int(q_lens.sum())
        seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [N]
        positions = torch.arange(row) - starts[seq_of_row] + (ctx_lens - q_lens)[seq_of_row]
        slot_mapping = padded[seq_of_row, positions // block_size] * block_size + (
            positions % block_size
        )  # [N]

        is_decode = q_lens == 1
        decode_seqs = is_decode.nonzero().squeeze(-1)
        max_ctx = int(ctx_lens[decode_seqs].max()) if decode_seqs.numel() else 0
        key_pos = torch.arange(max_ctx)  # [max_ctx]
        key_mask = key_pos[None, :] < ctx_lens[decode_seqs, None]  # [Bd, max_ctx]
        block_index = (key_pos // block_size).clamp(max=max(max_blocks - 1, 0))
        key_slots = padded[decode_seqs][:, block_index] * block_size + key_pos % block_size
        key_slots = key_slots.masked_fill(~key_mask, 0)  # [Bd, max_ctx]

        prefills: list[PrefillSpan] = []
        for i in (~is_decode).nonzero().squeeze(-1).tolist():
            q_len, ctx_len = int(q_lens[i]), int(ctx_lens[i])
            all_pos = torch.arange(ctx_len)
            slots = padded[i, all_pos // block_size] * block_size + all_pos % block_size
            mask = None
            if q_len < ctx_len:
                query_pos = torch.arange(ctx_len - q_len, ctx_len)[:, None]
                mask = (all_pos[None, :] <= query_pos).to(device)  # [q_len, ctx_len]
            begin = int(starts[i])
            prefills.append(PrefillSpan(begin, begin + q_len, slots.to(device), mask))
        decode_rows = starts[decode_seqs]
        return cls(
            num_tokens=row,
            slot_mapping=slot_mapping.to(device),
            prefills=prefills,
            decode_rows=torch.as_tensor(decode_rows, dtype=torch.long, device=device),
            decode_key_slots=key_slots.to(device),
            decode_mask=key_mask.to(device),
        )
