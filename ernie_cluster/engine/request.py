"""Driver-side state of one sequence being generated (one sample of a prompt).

The scheduler's invariant lives here: `num_computed_tokens` catches up with `num_tokens`
(prompt + output). Prefill chunks, decodes, prefix-cache hits and recompute after preemption
are all the same thing: computing the next tokens of this list. Never holds tensors (a
constrained sequence holds its grammar matcher).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ernie_cluster.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ernie_cluster.structured_output.manager import GrammarState


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6
    LOADING = 7
    """Admitted with host-tier hits: its blocks are being copied back; it runs next step."""

    @property
    def is_finished(self) -> bool:
        return RequestStatus.FINISHED_STOPPED <= self <= RequestStatus.FINISHED_ERROR


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    """Unique per sequence; for n > 1 each sample is its own Request sharing `parent_id`."""
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    """Ids that end this sequence (eos unless ignore_eos, plus params.stop_token_ids)."""
    max_tokens: int
    """params.max_tokens resolved against max_model_len."""
    parent_id: str
    sample_index: int = 0
    priority: int = 0
    arrival_seq: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first scheduling (-1: not yet)."""
    num_preemptions: int = 0
    loading_since: float | None = None
    """When it entered the LOADING state (host-tier blocks being copied back)."""
    prefill_leader: Request | None = None
    """For n > 1 siblings: wait until this sibling's prompt is computed, then hit its blocks."""
    first_scheduled_time: float | None = None
    stop_reason: int | str | None = None
    grammar: GrammarState | None = None
    """The output constraint's matcher; None when unconstrained."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Speculative decoding: tokens proposed for the next step (engine/speculative); the
    scheduler verifies as many as the step's budget allows."""
    last_verified: tuple[int, int] | None = None
    """(proposals verified, accepted) by the last step that verified some; the proposer
    reads and clears it."""
    num_lookahead_tokens: int | None = None
    """draft_model: proposals the draft makes after this sequence's next sampling step (the
    proposer sets it; None: the scheduler's default, k)."""
    answer_start_token_id: int | None = None
    """Stop strings apply only after this token (`<response>`) and the newline that follows
    it; None: from the first output token."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The first sample of a request with `prompt_logprobs`, its prompt not yet computed:
        every prompt position must run through the model, so it takes no prefix-cache hit
        (vLLM skips the cache for such requests too). Its n - 1 siblings hit its blocks."""
        return (
            self.params.prompt_logprobs is not None
            and self.sample_index == 0
            and not self.output_token_ids
        )

    @property
    def sort_key(self) -> tuple[int, int]:
        """Lower runs first: priority, then arrival (FCFS)."""
        return (self.priority, self.arrival_seq)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def is_ready(self) -> bool:
        """False while its grammar compiles, or an n > 1 sibling is still computing the shared
        prompt."""
        if self.grammar is not None and not self.grammar.is_ready:
            return False
        leader = self.prefill_leader
        # NOTE: the leader's first sampled token proves its prompt KV was written and the
        # blocks published; num_computed_tokens alone advances before the step runs.
        return leader is None or leader.is_finished or leader.num_output_tokens > 0
