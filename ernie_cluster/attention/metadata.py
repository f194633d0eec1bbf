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
from functools import cached_property

import torch


@dataclass
class PrefillSpan:
    """One sequence with several new tokens: rows [start, stop) of the flat batch."""

    start: int
    stop: int
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] blocks holding its keys
    context_len: int

    @property
    def has_prefix(self) -> bool:
        """Whether keys precede the new tokens (cached or earlier chunks); without, attention
        is plain causal."""
        return self.stop - self.start < self.context_len

    @cached_property
    def mask(self) -> torch.Tensor:
        """[num_new, context_len] True where a query may attend to a key. Built on first use
        and kept for the step's other layers: only backends without a mask-free path for
        spans with a prefix ask for it (2K x 32K is 64 MB)."""
        num_new = self.stop - self.start
        key_pos = torch.arange(self.context_len, device=self.block_ids.device)
        query_pos = key_pos[self.context_len - num_new :, None]
        return key_pos[None, :] <= query_pos


@dataclass
class AttentionMetadata:
    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] cache slot for each new token's K/V
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor  # [num_decodes] flat row of each decode token
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks] (0-padded)
    decode_mask: torch.Tensor  # [num_decodes, max_blocks * block_size] True for real keys
    block_size: int

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
        padded = torch.tensor(  # [B, max_blocks]
            [list(t) + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long
        ).reshape(num_seqs, max_blocks)
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
        # NOTE: decodes gather whole blocks (contiguous block_size-row copies), not slots.
        decode_blocks = (
            -(-int(ctx_lens[decode_seqs].max()) // block_size) if (decode_seqs.numel()) else 0
        )
        decode_block_table = padded[decode_seqs][:, :decode_blocks]  # [Bd, nb]
        key_pos = torch.arange(decode_blocks * block_size)
        key_mask = key_pos[None, :] < ctx_lens[decode_seqs, None]  # [Bd, nb * bs]

        prefills: list[PrefillSpan] = []
        for i in (~is_decode).nonzero().squeeze(-1).tolist():
            q_len, ctx_len = int(q_lens[i]), int(ctx_lens[i])
            begin = int(starts[i])
            blocks = padded[i, : -(-ctx_len // block_size)].to(device)
            prefills.append(PrefillSpan(begin, begin + q_len, blocks, ctx_len))
        decode_rows = starts[decode_seqs]
        return cls(
            num_tokens=row,
            slot_mapping=slot_mapping.to(device),
            prefills=prefills,
            decode_rows=decode_rows.to(device),
            decode_block_table=decode_block_table.to(device),
            decode_mask=key_mask.to(device),
            block_size=block_size,
        )
