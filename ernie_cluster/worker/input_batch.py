"""The worker's persistent batch: one row per live request, kept on the device between steps.

A request gets a row when it arrives and keeps it until it finishes (also while preempted;
the rows double when they run out). The row's block table
lives in a device tensor [max_num_reqs, max_blocks_per_req] with a host mirror; a step sends
only the entries that changed (new blocks) as (row, column, block) triples, applied on the
device. All of a step's host->device inputs (token ids, positions, slots, offsets, rows,
table edits) travel as ONE packed int64 buffer, pinned on CUDA. Nothing here reads a device
tensor back: building a step costs host time in the number of new tokens and sequences, never
in the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ernie_cluster.attention.metadata import AttentionMetadata, positions_and_slots
from ernie_cluster.worker.step_upload import StepUpload


@dataclass
class StepInputs:
    """One step's device tensors, views of the uploaded buffer (or derived on the device)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    sample_rows: torch.Tensor  # [S] int64 flat rows whose logits are sampled
    meta: AttentionMetadata


class InputBatch:
    def __init__(
        self,
        max_num_reqs: int,
        max_blocks_per_req: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_blocks_per_req = max_blocks_per_req
        self.block_size = block_size
        self.device = device
        self.block_table = torch.zeros(
            (max_num_reqs, max_blocks_per_req), dtype=torch.int32, device=device
        )
        self.block_table_host = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int64)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)  # [R] blocks held per row
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))
        self._pending_edits: list[np.ndarray] = []  # [k, 3] (row, column, block) triples

    # ------------------------------------------------------------------ rows and tables
    def add_row(self, block_ids: list[int]) -> int:
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self.num_blocks[row] = 0
        self.append_blocks(row, block_ids)
        return row

    def _grow(self) -> None:
        """Double the rows. Preempted requests keep their rows while they wait, so live
        requests can outnumber max_num_seqs; rare, and a device copy, not a step cost."""
        old_rows = self.max_num_reqs
        self.max_num_reqs *= 2
        table = self.block_table.new_zeros((self.max_num_reqs, self.max_blocks_per_req))
        table[:old_rows] = self.block_table
        self.block_table = table
        self.block_table_host = np.concatenate(
            [self.block_table_host, np.zeros_like(self.block_table_host)]
        )
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self._free_rows.extend(range(self.max_num_reqs - 1, old_rows - 1, -1))

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def reset_blocks(self, row: int, block_ids: list[int]) -> None:
        """A request back from preemption: its table starts over."""
        self.num_blocks[row] = 0
        self.append_blocks(row, block_ids)

    def truncate_blocks(self, row: int, num_blocks: int) -> None:
        """Forget the row's table entries past the first `num_blocks` (blocks the scheduler
        took back); the device entries stay, unread, until overwritten."""
        if not 0 <= num_blocks <= self.num_blocks[row]:
            raise ValueError(
                f"cannot keep {num_blocks} blocks of a row holding {int(self.num_blocks[row])}"
            )
        self.num_blocks[row] = num_blocks

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        stop = start + len(block_ids)
        if stop > self.max_blocks_per_req:
            raise ValueError(
                f"a request holds {stop} blocks, more than max_blocks_per_req="
                f"{self.max_blocks_per_req} (max_model_len / block_size)"
            )
        self.block_table_host[row, start:stop] = block_ids
        self.num_blocks[row] = stop
        edits = np.empty((stop - start, 3), dtype=np.int64)
        edits[:, 0] = row
        edits[:, 1] = np.arange(start, stop)
        edits[:, 2] = block_ids
        self._pending_edits.append(edits)

    # ------------------------------------------------------------------ one step
    def prepare(
        self,
        rows: np.ndarray,
        query_lens: np.ndarray,
        seq_lens: np.ndarray,
        input_ids: np.ndarray,
        sample_rows: np.ndarray,
        num_decodes: int,
    ) -> StepInputs:
        """rows/query_lens/seq_lens [B] in batch order (decodes first); input_ids [N];
        sample_rows [S] -> the step's device inputs, uploaded as one packed copy."""
        num_seqs = len(rows)
        positions, slots = positions_and_slots(
            query_lens, seq_lens, self.block_table_host, self.block_size, rows
        )  # [N] each
        starts = np.zeros(num_seqs + 1, dtype=np.int64)  # [B + 1] first row of each sequence
        np.cumsum(query_lens, out=starts[1:])
        edits = np.empty((0, 3), dtype=np.int64)
        if self._pending_edits:
            edits = np.concatenate(self._pending_edits)  # [k, 3]
            # NOTE: an entry edited twice since the last upload (a request re-sent after a
            # failed step) carries its latest value in both triples: which duplicate write
            # wins on the device is unspecified.
            edits[:, 2] = self.block_table_host[edits[:, 0], edits[:, 1]]
        edits = edits.reshape(-1)
        self._pending_edits.clear()
        parts = (input_ids, positions, slots, starts, seq_lens, rows, sample_rows, edits)
        device_parts = self._upload(parts)
        ids_d, pos_d, slots_d, starts_d, seq_lens_d, rows_d, sample_d, edits_d = device_parts
        if edits_d.numel():
            triples = edits_d.view(-1, 3)  # [k, 3]
            self.block_table[triples[:, 0], triples[:, 1]] = triples[:, 2].to(torch.int32)
        max_seq_len = int(seq_lens.max()) if num_seqs else 0
        num_columns = max(1, -(-max_seq_len // self.block_size))
        # [B, columns]: the batch's rows of the persistent table, on the device
        table = self.block_table[:, :num_columns].index_select(0, rows_d)
        meta = AttentionMetadata(
            query_lens=query_lens.tolist(),
            seq_lens=seq_lens.tolist(),
            block_size=self.block_size,
            slot_mapping=slots_d,
            query_start_loc=starts_d.to(torch.int32),
            seq_lens_tensor=seq_lens_d.to(torch.int32),
            block_table=table,
            num_decodes=num_decodes,
        )
        return StepInputs(input_ids=ids_d, positions=pos_d, sample_rows=sample_d, meta=meta)

    def _upload(self, parts: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        """Copy int64 host arrays to the device in one packed transfer -> device views."""
        # NOTE: a fresh pinned buffer per step: the host may run a step ahead of the GPU (a
        # prefill chunk samples nothing, so nothing waits for it), and torch's pinned
        # allocator reuses a block only after the copy that read it has finished.
        upload = StepUpload()
        slots = [upload.ints(part) for part in parts]
        upload.send(self.device)
        return [upload[slot] for slot in slots]
