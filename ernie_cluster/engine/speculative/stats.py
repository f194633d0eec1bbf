"""Counters of speculative decoding: proposals verified and accepted, per step and position."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0
    """Sequence-steps that verified at least one proposal (vLLM's num_drafts)."""
    num_draft_tokens: int = 0
    """Proposed tokens verified."""
    num_accepted_tokens: int = 0
    """Proposed tokens the target agreed with (kept as output)."""
    accepted_per_position: list[int] = field(default_factory=list)
    """[k] how often the i-th proposal of a step was accepted."""

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            missing = num_draft_tokens - len(self.accepted_per_position)
            self.accepted_per_position.extend([0] * missing)
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens (0 before any proposal)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying sequence gains per step: 1 + accepted proposals (vLLM's mean
        acceptance length; 0 before any proposal)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
