"""Per-token log-probabilities returned to the user: top alternatives plus the sampled token.

Computed from the raw model logits (before penalties, temperature and truncation), so they
describe the model's distribution rather than the sampling policy. Rows that did not ask for
logprobs cost nothing. The device part (`Logprobs.gather`) leaves its results on the device;
`to_entries` turns their host copy into one {token_id: logprob} dict per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie_cluster.sample.sampling_state import SamplingState
from ernie_cluster.worker.step_upload import Slot, StepUpload

TokenLogprobs = dict[int, float]


def top_and_chosen(
    logits: torch.Tensor, chosen_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From `logits` [L, V] and one chosen token id per row [L]: the rows' top token ids
    [L, num_top] int64 and logprobs [L, num_top] (most likely first), and the chosen tokens'
    logprobs [L]; log_softmax in float32, everything left on the device."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [L, V]
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)  # [L]
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [L, num_top]
    return top_ids, top_values, chosen


@dataclass(frozen=True)
class Logprobs:
    """Host plan of which rows want logprobs and how many alternatives."""

    rows: list[int]
    """[L] batch rows that asked, ascending."""
    num_top: list[int]
    """[L] `params.logprobs` of each of those rows."""
    max_top: int
    """Alternatives gathered per row: the largest `num_top`, at most V."""
    row_slot: Slot | None
    """The rows on the device; None when every row asked."""

    @classmethod
    def plan(
        cls, states: list[SamplingState], vocab_size: int, upload: StepUpload
    ) -> Logprobs | None:
        rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
        if not rows:
            return None
        num_top = [states[i].params.logprobs or 0 for i in rows]
        return cls(
            rows=rows,
            num_top=num_top,
            max_top=min(max(num_top), vocab_size),
            row_slot=None if len(rows) == len(states) else upload.ints(rows),
        )

    def gather(
        self, logits: torch.Tensor, token_ids: torch.Tensor, upload: StepUpload
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From raw `logits` [B, V] and sampled `token_ids` [B]: the rows' top token ids
        [L, max_top] int64 and logprobs [L, max_top] (most likely first), and the sampled
        tokens' logprobs [L], all float32 and on the device."""
        if self.row_slot is None:
            picked, sampled_ids = logits, token_ids  # [L, V], [L]
        else:
            rows = upload[self.row_slot]
            picked, sampled_ids = logits.index_select(0, rows), token_ids.index_select(0, rows)
        return top_and_chosen(picked, sampled_ids, self.max_top)

    def to_entries(
        self,
        token_ids: list[int],
        top_ids: list[float],
        top_values: list[float],
        sampled: list[float],
    ) -> list[TokenLogprobs | None]:
        """Per batch row, None or {token_id: logprob} of its top-`num_top` tokens, most likely
        first, then the sampled token if it is not one of them; from host copies of the batch's
        `token_ids` [B] and of `gather`'s results, flattened (ids as floats)."""
        entries: list[TokenLogprobs | None] = [None] * len(token_ids)
        for j, (row, num_top) in enumerate(zip(self.rows, self.num_top, strict=True)):
            start = j * self.max_top
            stop = start + min(num_top, self.max_top)
            ids = [int(t) for t in top_ids[start:stop]]
            entry = dict(zip(ids, top_values[start:stop], strict=True))
            entry.setdefault(token_ids[row], sampled[j])
            entries[row] = entry
        return entries
