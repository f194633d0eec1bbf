"""Verification of speculative proposals: which sampled rows a step keeps.

A sequence verifying k proposals d_0..d_{k-1} samples 1 + k rows: row i is the target's
distribution after the sequence plus d_0..d_{i-1}, sampled by the ordinary sampler (grammar
mask, logit bias, temperature, top-k/top-p/min-p, the request's seeded generator). The step
keeps rows 0..a, where a is the first i with sample_i != d_i (a = k when all match): the
accepted proposals, then the target's own token after them.

Why this is exact: the proposers here propose one token with certainty (a point mass q at
d_i). The standard speculative-sampling rule accepts d_i with probability min(1, p(d_i) /
q(d_i)) = p(d_i) and, on rejection, draws from max(0, p - q) renormalised, which is p without
d_i. Drawing x ~ p and accepting when x == d_i does both at once: P(accept) = p(d_i), and a
rejected draw is distributed as p conditioned on x != d_i. Greedy rows (argmax) reduce to
"accept while the target's argmax equals the proposal". So every kept token has exactly the
distribution the non-speculative step would have given it. With a seed it is the very same
token: the worker rewinds the sequence's generator to just after its last kept row, so row i
draws the noise a plain run draws for that position.
"""

from __future__ import annotations


def accepted_rows(
    sample_ids: list[str], tokens: list[int], spec_token_ids: dict[str, list[int]]
) -> list[int]:
    """The rows to keep, in order. `sample_ids` [S] names each row's request (a speculative
    request's 1 + k rows are consecutive), `tokens` [S] the sampled token of each row."""
    if not spec_token_ids:
        return list(range(len(sample_ids)))  # no proposals this step: every row is kept
    kept: list[int] = []
    row = 0
    while row < len(sample_ids):
        drafts = spec_token_ids.get(sample_ids[row], ())
        accepted = 0
        while accepted < len(drafts) and tokens[row + accepted] == drafts[accepted]:
            accepted += 1
        kept.extend(range(row, row + accepted + 1))
        row += len(drafts) + 1
    return kept
