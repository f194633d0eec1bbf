"""Where speculative work fits in a scheduled step: only in what the step left over.

Once decodes, prefill chunks and admissions are scheduled, `add_proposals` lets decoding
sequences verify their proposals in the leftover token budget and free blocks, and
`reserve_lookahead` (draft_model) gives each sequence that samples this step free slots past
its scheduled tokens, where the draft writes the KV of its proposal steps. Neither preempts,
delays or keeps out a request; a sequence that gets no slots proposes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ernie_cluster.step_io import SchedulerOutput

if TYPE_CHECKING:
    from ernie_cluster.engine.scheduler import Scheduler


def add_proposals(scheduler: Scheduler, out: SchedulerOutput, budget: int) -> None:
    """Schedule each decoding request's proposals (`Request.spec_token_ids`) as far as the
    leftover `budget` and free blocks allow."""
    for request in scheduler.running:
        req_id = request.request_id
        if budget <= 0:
            return
        if not request.spec_token_ids or out.num_scheduled_tokens.get(req_id) != 1:
            continue
        if request.num_computed_tokens != request.num_tokens:
            continue  # not a decode: the last prompt token of a chunked prefill
        num_drafts = min(len(request.spec_token_ids), budget)
        if not scheduler.extend_table(out, request, request.num_tokens + num_drafts):
            continue
        out.spec_token_ids[req_id] = request.spec_token_ids[:num_drafts]
        out.num_scheduled_tokens[req_id] += num_drafts
        request.num_computed_tokens += num_drafts
        budget -= num_drafts


def reserve_lookahead(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """draft_model: slots for `Request.num_lookahead_tokens` (None: the configured k) draft
    proposals after each request that samples this step, from the free blocks. The draft
    writes its proposals' KV there (positions num_tokens - 1 on, after the step's tokens are
    appended); the scheduler gives the blocks back once the step's tokens are in (`_trim`)."""
    default = scheduler.config.num_lookahead_tokens
    if not default:
        return
    max_model_len = scheduler.config.max_model_len
    for request in scheduler.running:
        req_id = request.request_id
        if req_id not in out.num_scheduled_tokens or request.max_tokens == 0:
            continue
        num_drafts = len(out.spec_token_ids.get(req_id, ()))
        if request.num_computed_tokens != request.num_tokens + num_drafts:
            continue  # a prefill chunk short of the prompt's end samples nothing
        wanted = default if request.num_lookahead_tokens is None else request.num_lookahead_tokens
        # NOTE: the slots past max_model_len have no column in the block table; proposals
        # never reach there anyway.
        num = min(wanted, max_model_len - request.num_computed_tokens)
        if num > 0 and scheduler.extend_table(out, request, request.num_computed_tokens + num):
            out.num_lookahead_tokens[req_id] = num
