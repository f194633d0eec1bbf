"""Block tables for the paged-attention kernel tests: each sequence's blocks scattered over a
pool with spare blocks nobody owns, and the same tables padded with a poison block, so a
kernel that reads past a row's blocks reads garbage the test sees."""

from __future__ import annotations

import dataclasses

import torch

from ernie_cluster.attention import AttentionMetadata


@dataclasses.dataclass
class PagedTables:
    meta: AttentionMetadata  # what the reference reads
    poisoned_meta: AttentionMetadata  # same, with the poison block past each row's blocks
    num_blocks: int
    poison: int  # the block every unused table entry points at


def paged_tables(
    query_lens, context_lens, block_size: int, gen: torch.Generator, spare: int, device
) -> PagedTables:
    blocks_per_seq = [-(-ctx // block_size) for ctx in context_lens]
    num_blocks = sum(blocks_per_seq) + spare
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    poison = block_ids.pop()
    tables, used = [], 0
    for count in blocks_per_seq:
        tables.append(block_ids[used : used + count])
        used += count
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
    poisoned = torch.full((len(tables), max(blocks_per_seq) + 2), poison, dtype=torch.int32)
    for i, table in enumerate(tables):
        poisoned[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    poisoned_meta = dataclasses.replace(meta, block_table=poisoned.to(device))
    return PagedTables(meta, poisoned_meta, num_blocks, poison)
