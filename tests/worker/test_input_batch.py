"""The persistent batch: rows kept per request, table edits sent as diffs, one packed upload,
and slot mappings equal to AttentionMetadata.build's from whole block tables."""

from __future__ import annotations

import numpy as np
import torch

from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.worker.input_batch import InputBatch

BLOCK = 4


def prepare(batch: InputBatch, rows, query_lens, seq_lens):
    query_lens, seq_lens = np.asarray(query_lens), np.asarray(seq_lens)
    num_tokens = int(query_lens.sum())
    num_decodes = int(np.argmax(query_lens != 1)) if (query_lens != 1).any() else len(rows)
    return batch.prepare(
        np.asarray(rows),
        query_lens,
        seq_lens,
        np.arange(num_tokens),
        np.cumsum(query_lens) - 1,
        num_decodes,
    )


def test_matches_metadata_build_over_steps_with_growth_and_resets():
    batch = InputBatch(
        max_num_reqs=2, max_blocks_per_req=8, block_size=BLOCK, device=torch.device("cpu")
    )
    tables = {"a": [7, 3], "b": [5], "c": [1, 9, 2]}
    rows = {name: batch.add_row(list(t)) for name, t in tables.items()}  # grows 2 -> 4 rows
    assert batch.max_num_reqs == 4 and len(set(rows.values())) == 3
    steps = [
        # (name, new tokens, context after the step, blocks appended before the step)
        [("a", 1, 6, []), ("b", 3, 4, []), ("c", 9, 9, [])],
        [("a", 1, 7, []), ("b", 1, 5, [8]), ("c", 1, 10, [])],
    ]
    for step in steps:
        for name, _, _, new_blocks in step:
            batch.append_blocks(rows[name], new_blocks)
            tables[name] += new_blocks
        names = [s[0] for s in step]
        q_lens, ctx = [s[1] for s in step], [s[2] for s in step]
        inputs = prepare(batch, [rows[n] for n in names], q_lens, ctx)
        want = AttentionMetadata.build(q_lens, ctx, [tables[n] for n in names], BLOCK)
        assert torch.equal(inputs.meta.slot_mapping, want.slot_mapping)
        assert torch.equal(inputs.meta.query_start_loc, want.query_start_loc)
        assert torch.equal(inputs.meta.seq_lens_tensor, want.seq_lens_tensor)
        for i, name in enumerate(names):
            num = len(tables[name])
            assert inputs.meta.block_table[i, :num].tolist() == tables[name]
        assert inputs.positions.tolist() == [
            p for q, c in zip(q_lens, ctx, strict=True) for p in range(c - q, c)
        ]
    # a preempted request resumes with a new table; a freed row is reused
    batch.reset_blocks(rows["c"], [4, 6, 0])
    batch.free_row(rows["a"])
    assert batch.add_row([11]) == rows["a"]
    inputs = prepare(batch, [rows["c"], rows["a"]], [1, 1], [10, 2])
    assert inputs.meta.block_table[0, :3].tolist() == [4, 6, 0]
    assert inputs.meta.slot_mapping.tolist() == [0 * BLOCK + 1, 11 * BLOCK + 1]


def test_table_edits_travel_once():
    batch = InputBatch(
        max_num_reqs=4, max_blocks_per_req=8, block_size=BLOCK, device=torch.device("cpu")
    )
    row = batch.add_row([3, 4])
    prepare(batch, [row], [5], [5])
    assert batch._pending_edits == []  # applied by the step that uploaded them
    batch.append_blocks(row, [6])
    inputs = prepare(batch, [row], [1], [9])
    assert inputs.meta.block_table[0, :3].tolist() == [3, 4, 6]
    assert inputs.meta.slot_mapping.tolist() == [6 * BLOCK]
