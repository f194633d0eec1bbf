"""The boundary types of one engine step: driver -> workers and workers -> driver.

New requests travel in full once; running requests travel as diffs (new block ids, computed
count). Workers keep their own per-request state (token ids, sampling state) between steps.
Plain dataclasses of Python scalars and lists, cheap to pickle, plus the grammar bitmask (a
small host tensor that only rank 0, the sampler, receives). A neutral module: the engine
builds these, executors carry them and workers read them, without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ernie_cluster.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: list[int]
    sample_index: int
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]
    """Appended to the worker's block table; the whole table when `resumed`."""
    num_computed_tokens: int
    resumed: bool = False
    """Back from preemption: the worker recomputes from `num_computed_tokens` (its token ids
    and sampling state were kept)."""
    num_kept_blocks: int | None = None
    """The worker's table keeps only its first `num_kept_blocks` entries before
    `new_block_ids` are appended: blocks past the accepted tokens of a speculative step went
    back to the pool (None: keep the whole table)."""


@dataclass
class GrammarBitmask:
    """Allowed next tokens of the constrained sequences that sample this step."""

    request_ids: list[str]
    """The sequence of each row of `bitmask`."""
    bitmask: torch.Tensor
    """[G, ceil(vocab / 32)] int32 on the host; bit t of a row set = token t allowed."""
    offsets: list[int] | None = None
    """[G] which of its sequence's sampled positions each row masks (a speculative step
    samples 1 + k positions of one sequence: row i assumes the first i proposals); None: 0."""


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens each request computes this step, in batch order."""
    finished_req_ids: list[str] = field(default_factory=list)
    """Requests that ended since the last step: workers drop their state."""
    grammar: GrammarBitmask | None = None
    """Token masks of constrained sequences; sent to rank 0 only."""
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """Speculative decoding: the proposed tokens a request verifies this step. Its scheduled
    tokens are its last sampled token plus these; it samples at each of the 1 + k positions
    and keeps the proposals up to the first one the target disagrees with."""
    num_lookahead_tokens: dict[str, int] = field(default_factory=dict)
    """draft_model: requests that sample this step and then get n draft proposals, by n. Their
    tables hold n slots past the scheduled tokens, where the draft's KV of its proposal steps
    lands (worker/draft_runner, rank 0 only)."""
    kv_saves: list[tuple[int, int]] = field(default_factory=list)
    """Host KV tier: (device block, host slot) copies run before this step's forward (the
    device blocks are reused by it). Every rank copies its own shard."""
    kv_loads: list[tuple[int, int]] = field(default_factory=list)
    """Host KV tier: (host slot, device block) copies run after the saves; the blocks are read
    from the next step on, so the copies may overlap this step's forward."""

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def has_kv_copies(self) -> bool:
        return bool(self.kv_saves or self.kv_loads)

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """The new tokens of each request that sampled (only requests whose scheduled tokens
    reached the end of their sequence do): one, or with speculation the accepted proposals
    followed by the token sampled after them."""
    logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    """Requests with `params.logprobs`: one {token_id: logprob} per new token."""
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    """Requests with `params.prompt_logprobs`: one {token_id: logprob} per prompt token this
    step predicted (positions 1.. of the prompt, in order, continuing the previous steps')."""
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """draft_model: the draft's greedy proposals for each request in `num_lookahead_tokens`
    that sampled, continuing its new tokens (the proposer gates them before the next step)."""
