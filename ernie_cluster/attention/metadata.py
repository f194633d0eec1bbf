"""Per-step attention metadata for a flat batch of tokens over a paged KV cache.

Built once per step and shared by every layer. Two halves: host facts that the scheduler
already knows (query and context lengths as Python ints, so reading them never waits on the
device) and device index tensors (slot mapping, query offsets, context lengths, block table)
that kernels read in place. Holds index tensors only; never model activations.

Layout: the step's tokens are the concatenation of each sequence's new tokens. The leading run
of sequences with exactly one new token are the decodes (rows [0, num_decodes)); every later
sequence is a prefill span (a fresh prompt, or a chunk after a cached prefix), attended
causally among its own tokens and fully to the keys before it. The model runner puts decodes
first; any order is still correct (a late one-token sequence is a one-row span).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass
class PrefillSpan:
    """One sequence attended as a span: rows [start, stop) of the flat batch."""

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
    # Host facts (Python ints from the scheduler).
    query_lens: list[int]  # [B] new tokens of each sequence
    seq_lens: list[int]  # [B] context length of each sequence, this step's tokens included
    block_size: int
    # Device tensors.
    slot_mapping: torch.Tensor  # [N] int64 cache slot for each new token's K/V
    query_start_loc: torch.Tensor  # [B + 1] int32 first row of each sequence, then N
    seq_lens_tensor: torch.Tensor  # [B] int32 = seq_lens
    block_table: torch.Tensor  # [B, max_blocks] int32; row i valid up to its context
    num_decodes: int = -1
    """Sequences [0, num_decodes) have one new token each (rows [0, num_decodes)); -1 means
    "count the leading run of one-token sequences"."""

    def __post_init__(self) -> None:
        if self.num_decodes < 0:
            count = 0
            for q_len in self.query_lens:
                if q_len != 1:
                    break
                count += 1
            self.num_decodes = count

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @cached_property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes

    @cached_property
    def max_seq_len(self) -> int:
        return max(self.seq_lens, default=0)

    @cached_property
    def max_decode_seq_len(self) -> int:
        return max(self.seq_lens[: self.num_decodes], default=0)

    @cached_property
    def max_prefill_query_len(self) -> int:
        return max(self.query_lens[self.num_decodes :], default=0)

    @cached_property
    def prefills(self) -> list[PrefillSpan]:
        """The spans after the decodes, with their host offsets and device block ids."""
        spans: list[PrefillSpan] = []
        start = self.num_decodes
        for i in range(self.num_decodes, self.num_seqs):
            q_len, ctx_len = self.query_lens[i], self.seq_lens[i]
            num_blocks = -(-ctx_len // self.block_size)
            block_ids = self.block_table[i, :num_blocks].long()
            spans.append(PrefillSpan(start, start + q_len, block_ids, ctx_len))
            start += q_len
        return spans

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """From Python lists (tests, benchmarks). `context_lens[i]` counts sequence i's tokens
        including this step's new ones. The model runner builds its metadata from its
        persistent device batch instead (worker/input_batch)."""
        if not len(query_lens) == len(context_lens) == len(block_tables):
            raise ValueError(
                f"query_lens ({len(query_lens)}), context_lens ({len(context_lens)}) and "
                f"block_tables ({len(block_tables)}) must have one entry per sequence"
            )
        for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 0 < q_len <= ctx_len or len(table) * block_size < ctx_len:
                raise ValueError(
                    f"bad sequence: {q_len} new tokens, context {ctx_len}, "
                    f"{len(table)} blocks of {block_size}"
                )
        num_seqs = len(query_lens)
        max_blocks = max((len(t) for t in block_tables), default=0)
        table = np.zeros((num_seqs, max(max_blocks, 1)), dtype=np.int32)  # [B, max_blocks]
        for i, blocks in enumerate(block_tables):
            table[i, : len(blocks)] = blocks
        q_lens = np.asarray(query_lens, dtype=np.int64)
        ctx_lens = np.asarray(context_lens, dtype=np.int64)
        _, slots = positions_and_slots(q_lens, ctx_lens, table, block_size)
        starts = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=starts[1:])
        return cls(
            query_lens=[int(x) for x in query_lens],
            seq_lens=[int(x) for x in context_lens],
            block_size=block_size,
            slot_mapping=torch.from_numpy(slots).to(device),
            query_start_loc=torch.from_numpy(starts).to(device),
            seq_lens_tensor=torch.from_numpy(ctx_lens.astype(np.int32)).to(device),
            block_table=torch.from_numpy(table).to(device),
        )


def positions_and_slots(
    query_lens: np.ndarray,
    context_lens: np.ndarray,
    block_table: np.ndarray,
    block_size: int,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """[N] absolute position and [N] int64 cache slot of every new token, from [B] lengths and
    a block table whose row `rows[i]` (default i) belongs to sequence i. Vectorised: O(N),
    whatever the contexts."""
    num_seqs = len(query_lens)
    seq_of_row = np.repeat(np.arange(num_seqs), query_lens)  # [N]
    starts = np.cumsum(query_lens) - query_lens  # [B]
    positions = np.arange(int(query_lens.sum())) - starts[seq_of_row]
    positions += (context_lens - query_lens)[seq_of_row]  # [N] absolute positions
    table_rows = seq_of_row if rows is None else rows[seq_of_row]
    blocks = block_table[table_rows, positions // block_size].astype(np.int64)
    return positions, blocks * block_size + positions % block_size
