"""Which decoding sequences get speculative proposals, and how many.

Before each step the engine asks for proposals for the running sequences that are decoding
(one uncomputed token). A sequence gets none before its first output token, and none when
verification could not keep its output exact or useful:
- penalties (repetition, frequency, presence): the penalty of position i would need the
  proposals before it in the output history;
- `min_tokens` not reached yet: the stop-token mask of position i depends on i;
- no room: proposals never run past `max_tokens` or `max_model_len`.
A constrained sequence's proposals are cut at the first token its grammar refuses. The
scheduler may send fewer than proposed (token budget, KV blocks); never more.

How many: verifying a proposal costs a token's compute whether or not it is accepted (on a CPU
about as much as a decode token), so each sequence proposes only as far as its proposals pay.
It keeps a running acceptance rate r (starting at 0.5, moved 30% toward each verified step's
accepted / proposed); if acceptances were independent, the n-th proposal of a step would be
kept with probability r^n, so it proposes the largest n <= k with r^n >= `min_acceptance`. A
sequence at n = 0 still proposes one token every 16 steps, so a change of pattern is noticed.

`draft_model` and `ernie_mtp` proposals come from the worker after each step
(`take_draft_tokens`), so the draft must know one step ahead how many to make:
`num_lookahead_tokens`, the most the sequence's acceptance could pay for after that step (0
for one that never gets proposals).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ernie_cluster.config.speculative_config import MODEL_METHODS, SpeculativeConfig
from ernie_cluster.engine.request import Request
from ernie_cluster.engine.speculative.draft_model import DraftModelProposer
from ernie_cluster.engine.speculative.ngram import NgramProposer
from ernie_cluster.engine.speculative.suffix import SuffixProposer
from ernie_cluster.sample.sampling_state import has_penalties

logger = logging.getLogger(__name__)

_RATE_STEP = 0.3
"""How far each verified step moves a sequence's acceptance rate toward its own outcome."""
_PROBE_EVERY = 16
"""Steps between single-token probes of a sequence whose proposals stopped paying."""


@dataclass
class _Acceptance:
    rate: float = 0.5
    idle_steps: int = 0


class SpeculativeProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self._method: NgramProposer | SuffixProposer | DraftModelProposer
        self._draft: DraftModelProposer | None = None
        if config.method == "ngram":
            self._method = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        elif config.method in MODEL_METHODS:  # draft_model, ernie_mtp: made in the worker
            self._method = self._draft = DraftModelProposer()
        else:
            self._method = SuffixProposer(
                config.suffix_decoding_max_tree_depth,
                config.suffix_decoding_max_cached_requests,
                config.suffix_decoding_max_spec_factor,
                config.suffix_decoding_min_token_prob,
            )
        self._requests: dict[str, Request] = {}
        """Every sequence seen running, until it is no longer live."""
        self._num_indexed: dict[str, int] = {}
        self._acceptance: dict[str, _Acceptance] = {}

    def propose(self, running: Iterable[Request], live: Iterable[str]) -> None:
        """Set `spec_token_ids` of each running sequence (empty when it gets none), after
        forgetting the sequences no longer in `live` (the suffix method keeps their outputs
        for the others)."""
        live_ids = set(live)
        for req_id in [r for r in self._requests if r not in live_ids]:
            self._forget(req_id)
        for request in running:
            if self._requests.setdefault(request.request_id, request) is not request:
                self._forget(request.request_id)  # an ended request's id, reused
                self._requests[request.request_id] = request
            request.spec_token_ids = self._drafts(request)
            if self._draft is not None:
                request.num_lookahead_tokens = self._lookahead(request)

    def take_draft_tokens(self, draft_token_ids: dict[str, list[int]]) -> None:
        """draft_model: the draft's proposals of the step that just ran (runner output), for
        the next `propose` to gate."""
        if self._draft is not None:
            self._draft.receive(draft_token_ids)

    def _forget(self, req_id: str) -> None:
        """The sequence ended: the method gets its whole output (suffix keeps it), and every
        state of it goes."""
        request = self._requests.pop(req_id)
        self._num_indexed.pop(req_id, None)
        self._acceptance.pop(req_id, None)
        self._method.finish(req_id, request.output_token_ids)

    def _drafts(self, request: Request) -> list[int]:
        params = request.params
        if (
            request.num_tokens - request.num_computed_tokens != 1
            or request.num_output_tokens == 0
            or request.max_tokens == 0
            or has_penalties(params)
            or request.num_output_tokens < params.min_tokens
        ):
            return []
        room = min(
            self._worth_proposing(request),
            request.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        if room <= 0:
            return []
        self._index(request)
        req_id = request.request_id
        drafts = self._method.propose(req_id, room)
        if drafts and request.grammar is not None:
            try:
                drafts = drafts[: request.grammar.allowed_prefix(drafts)]
            except Exception:  # a matcher error must not fail the whole step
                logger.exception("grammar check of proposals failed; %s gets none", req_id)
                return []
        return drafts

    def _worth_proposing(self, request: Request) -> int:
        """Proposals the sequence's acceptance so far pays for (module docstring)."""
        state = self._acceptance.setdefault(request.request_id, _Acceptance())
        if request.last_verified is not None:
            proposed, accepted = request.last_verified
            request.last_verified = None
            state.rate += _RATE_STEP * (accepted / proposed - state.rate)
        count = self._count(state.rate)
        if count:
            state.idle_steps = 0
            return count
        state.idle_steps += 1
        if state.idle_steps >= _PROBE_EVERY:
            state.idle_steps = 0
            return 1
        return 0

    def _count(self, rate: float) -> int:
        """The largest n <= k with rate^n >= min_acceptance."""
        k, floor = self.config.num_speculative_tokens, self.config.min_acceptance
        count = 0
        while count < k and rate ** (count + 1) >= floor:
            count += 1
        return count

    def _lookahead(self, request: Request) -> int:
        """draft_model: proposals to draft after the sequence's next step: what `_drafts` could
        take then, i.e. the count at the rate a fully accepted step would leave (or the probe),
        within the room one more token leaves."""
        params = request.params
        next_outputs = request.num_output_tokens + 1 + len(request.spec_token_ids)
        if request.max_tokens == 0 or has_penalties(params) or next_outputs < params.min_tokens:
            return 0
        room = request.max_tokens - request.num_output_tokens - 2
        state = self._acceptance.get(request.request_id) or _Acceptance()
        count = self._count(state.rate + _RATE_STEP * (1 - state.rate))
        if count == 0 and state.idle_steps + 1 >= _PROBE_EVERY:
            count = 1
        return max(0, min(count, room))

    def _index(self, request: Request) -> None:
        """Feed the method the sequence's tokens it has not seen."""
        req_id = request.request_id
        seen = self._num_indexed.get(req_id, 0)
        num_prompt = request.num_prompt_tokens
        if seen < num_prompt:
            new = request.prompt_token_ids[seen:] + request.output_token_ids
        else:
            new = request.output_token_ids[seen - num_prompt :]
        if new:
            self._method.extend(req_id, new)
        self._num_indexed[req_id] = request.num_tokens
