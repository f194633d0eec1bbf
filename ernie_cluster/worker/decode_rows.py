"""Decode rows of a step whose sequences are all decodes or verifies, for the whole-step decode
graphs (worker/cuda_graphs).

A verify (a decoding sequence's last token plus its k proposals, sample/speculative) runs as a
short extend. Attention writes every token's K/V into the cache before it reads any, so the
token of sequence i at position p, attending with the decode kernel to i's blocks with
seq_len = p + 1, gets exactly the extend's causal attention. Such a step is therefore a decode
step of one row per query token. Owns that test and that relayout only; never reads the device
back, and keeps the flat token order, so the step's sampled rows name the same tokens.
"""

from __future__ import annotations

import torch

from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.step_io import SchedulerOutput
from ernie_cluster.worker.input_batch import StepInputs


def is_decode_and_verify(out: SchedulerOutput) -> bool:
    """Whether every scheduled sequence is a decode (one token) or a verify (its last sampled
    token plus its proposals): a step with no prefill chunk."""
    spec = out.spec_token_ids
    return all(n == 1 + len(spec.get(r, ())) for r, n in out.num_scheduled_tokens.items())


def as_decode_rows(inputs: StepInputs) -> StepInputs:
    """The same tokens as one-token sequences: row j keeps token j's id, position and slot and
    attends through its sequence's block-table row to the keys up to its own position."""
    meta = inputs.meta
    num_tokens = meta.num_tokens
    device = meta.query_start_loc.device
    rows = torch.arange(num_tokens + 1, dtype=torch.int32, device=device)  # [T + 1]
    # [T] the sequence of each token: how many sequences end at or before it
    seq_of_token = torch.searchsorted(meta.query_start_loc[1:], rows[:-1], right=True)
    seq_lens: list[int] = []  # [T] host: position + 1 of each token
    for q_len, seq_len in zip(meta.query_lens, meta.seq_lens, strict=True):
        seq_lens.extend(range(seq_len - q_len + 1, seq_len + 1))
    rows_meta = AttentionMetadata(
        query_lens=[1] * num_tokens,
        seq_lens=seq_lens,
        block_size=meta.block_size,
        slot_mapping=meta.slot_mapping,
        query_start_loc=rows,
        seq_lens_tensor=(inputs.positions + 1).to(torch.int32),  # [T]
        block_table=meta.block_table.index_select(0, seq_of_token),  # [T, columns]
        num_decodes=num_tokens,
    )
    return StepInputs(inputs.input_ids, inputs.positions, inputs.sample_rows, rows_meta)
