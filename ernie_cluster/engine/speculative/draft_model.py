"""`draft_model` proposals on the driver: the draft's greedy tokens, made in the worker.

The draft model runs on rank 0 (worker/draft_runner): after each step it proposes for the
sequences the scheduler reserved lookahead slots for, and the runner output carries those
proposals back. This side only holds them until the next step's `SpeculativeProposer.propose`
gates them (room, penalties, min_tokens, grammar, acceptance) like any method's.
"""

from __future__ import annotations

from collections.abc import Sequence


class DraftModelProposer:
    """The last step's draft proposals, by sequence; the same interface as the ngram and
    suffix proposers, plus `receive`."""

    def __init__(self) -> None:
        self._pending: dict[str, list[int]] = {}

    def receive(self, draft_token_ids: dict[str, list[int]]) -> None:
        """The proposals of the step that just ran, replacing the last step's: a sequence's
        tokens change only through a step, which brings its new proposals (or none)."""
        self._pending = draft_token_ids

    def extend(self, req_id: str, tokens: Sequence[int]) -> None:
        """Nothing to index: the draft saw the tokens in the worker."""

    def propose(self, req_id: str, num_tokens: int) -> list[int]:
        return self._pending.pop(req_id, [])[:num_tokens]

    def finish(self, req_id: str, outputs: Sequence[int]) -> None:
        self._pending.pop(req_id, None)
