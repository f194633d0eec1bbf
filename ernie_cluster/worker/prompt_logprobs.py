"""Prompt logprobs: the logprob of each prompt token given the tokens before it, plus top-k.

For the requests whose `params.prompt_logprobs` is set, the runner notes which rows of a
step's hidden states predict a prompt token (`PromptLogprobsPlan`); `compute` applies lm_head
to exactly those rows (vocab-parallel at W > 1: `compute_logits` gathers the vocabulary to rank
0), takes log_softmax in float32 and gathers each next prompt token's logprob and the top-k.
Steps of requests that do not ask never come here; steps that do pay one extra upload and one
device->host copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.sample.logprobs import Logprobs, TokenLogprobs, top_and_chosen
from ernie_cluster.sample.sampler import SamplerOutput
from ernie_cluster.worker.step_upload import StepUpload

# NOTE: lm_head rows per pass: [rows, V] float32 logits plus their log_softmax stay around
# 2 x 100 MB at ERNIE's 103K vocabulary however long the prompt chunk is.
ROWS_PER_PASS = 128


@dataclass
class PromptLogprobsPlan:
    """Host plan of one step: which hidden rows predict which prompt token, per request."""

    req_ids: list[str] = field(default_factory=list)
    """Requests with rows this step, in batch order."""
    counts: list[int] = field(default_factory=list)
    """Rows of each of those requests (consecutive in `rows`)."""
    rows: list[int] = field(default_factory=list)
    """[R] rows of the step's packed hidden states."""
    targets: list[int] = field(default_factory=list)
    """[R] the prompt token each row predicts (the next one)."""
    num_top: list[int] = field(default_factory=list)
    """[R] `params.prompt_logprobs` of each row's request."""

    def add(self, req_id: str, rows: range, targets: list[int], num_top: int) -> None:
        self.req_ids.append(req_id)
        self.counts.append(len(rows))
        self.rows.extend(rows)
        self.targets.extend(targets)
        self.num_top.extend([num_top] * len(rows))


def plan_rows(start: int, stop: int, num_prompt: int, done: int) -> tuple[int, int]:
    """The sequence positions [lo, hi) of a step computing positions [start, stop) whose hidden
    states predict a prompt token not yet reported: position j predicts prompt token j + 1, so
    j < num_prompt - 1; `done` positions were reported by earlier steps (a recompute after
    preemption reports nothing twice)."""
    lo = max(start, done)
    hi = min(stop, num_prompt - 1)
    return lo, max(lo, hi)


def compute(
    model: Ernie4_5_MoeForCausalLM, hidden: torch.Tensor, plan: PromptLogprobsPlan
) -> dict[str, list[TokenLogprobs]]:
    """{request: one {token_id: logprob} per planned row, in order} on rank 0 (every rank runs
    the lm_head collectives; the others return {}). `hidden` [n, H] from the step's forward."""
    device = hidden.device
    upload = StepUpload()
    rows_slot, targets_slot = upload.ints(plan.rows), upload.ints(plan.targets)
    upload.send(device)
    rows, targets = upload[rows_slot], upload[targets_slot]  # [R] each
    vocab_size = model.config.vocab_size
    max_top = min(max(plan.num_top), vocab_size)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(plan.rows), ROWS_PER_PASS):
        stop = min(start + ROWS_PER_PASS, len(plan.rows))
        logits = model.compute_logits(hidden, rows[start:stop])  # [r, V] on rank 0
        if logits is not None:
            parts.append(top_and_chosen(logits, targets[start:stop], max_top))
    if not parts:
        return {}
    top_ids, top_values, chosen = (torch.cat(p) for p in zip(*parts, strict=True))
    entries_plan = Logprobs(
        rows=list(range(len(plan.rows))), num_top=plan.num_top, max_top=max_top, row_slot=None
    )
    # NOTE: SamplerOutput's packed copy: targets, logprobs and top-k in one transfer.
    _, entries = SamplerOutput(targets, entries_plan, top_ids, top_values, chosen).to_host()
    out: dict[str, list[TokenLogprobs]] = {}
    first = 0
    for req_id, count in zip(plan.req_ids, plan.counts, strict=True):
        out[req_id] = entries[first : first + count]  # type: ignore[assignment]
        first += count
    return out
