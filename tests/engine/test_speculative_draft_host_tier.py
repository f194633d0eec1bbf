"""`draft_model` with the host KV tier: the draft's blocks go down to the host and come back
with the target's, so its cache still mirrors the target's after host hits and swaps."""

from __future__ import annotations

from test_host_tier_equivalence import (  # noqa: F401  (checkpoint, reference: fixtures)
    _assert_the_tier_worked,
    checkpoint,
    reference,
    run_scenario,
)


def test_the_drafts_blocks_travel_with_the_host_tier(checkpoint, reference):  # noqa: F811
    """Sessions evicted to the host and returning, preempted requests swapped back in, the
    target its own draft: a draft block not copied back holds whatever its pool last had
    there, and the draft then proposes other tokens than the target's greedy ones."""
    spec = {
        "method": "draft_model",
        "model": str(checkpoint),
        "num_speculative_tokens": 4,
        "min_acceptance": 0,
    }
    deltas, stats, _ = run_scenario(
        checkpoint, reference, 1, num_host_kv_blocks=256, speculative_config=spec
    )
    _assert_the_tier_worked(deltas, stats)
    assert stats.spec_decode.num_draft_tokens > 100
    assert stats.spec_decode.acceptance_rate > 0.97, stats.spec_decode
