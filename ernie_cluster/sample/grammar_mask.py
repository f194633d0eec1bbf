"""Applies the step's grammar bitmask to the logits of the constrained rows (rank 0 only).

The driver fills one bitmask row per constrained sequence; here each row is placed at its
sequence's logits row and every disallowed token becomes -inf before sampling, so penalties,
temperature and logprobs all see the constrained distribution.
"""

from __future__ import annotations

import torch
import xgrammar

from ernie_cluster.step_io import GrammarBitmask


def apply_grammar_bitmask(
    logits: torch.Tensor, grammar: GrammarBitmask, sample_ids: list[str]
) -> None:
    """Mask `logits` [S, V] in place; `sample_ids` names the sequence of each logits row (a
    speculative sequence's 1 + k rows are consecutive; the bitmask's offsets pick among them)."""
    first_row: dict[str, int] = {}
    for row, req_id in enumerate(sample_ids):
        first_row.setdefault(req_id, row)
    offsets = grammar.offsets or [0] * len(grammar.request_ids)
    rows = [first_row[r] + offset for r, offset in zip(grammar.request_ids, offsets, strict=True)]
    num_rows, num_words = logits.shape[0], grammar.bitmask.shape[1]
    # NOTE: the G rows are spread into an all-allowed [S, W] mask (one small host tensor,
    # uploaded pinned) applied to every row: with `indices`, xgrammar would copy that list to
    # the device from pageable memory, a hidden sync.
    full = torch.full((num_rows, num_words), -1, dtype=torch.int32)  # [S, W]
    full[rows] = grammar.bitmask
    if logits.device.type != "cpu":
        full = full.pin_memory().to(logits.device, non_blocking=True)
    xgrammar.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[1])
