"""Truncation of temperature-scaled logits: top-k, top-p (nucleus) and min-p.

Per-row parameters arrive as tensors; rows with a filter switched off pass through
unchanged. Each filter becomes a per-row logit threshold, so tokens tied with the last kept
one are kept too. Top-k-only rows and top-p rows form two groups; each needs only its
`torch.topk` candidates, except that the top-p group is sorted over the whole vocabulary
(once) when one of its rows has no top-k.
"""

from __future__ import annotations

import torch


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Set `logits` [R, V] to -inf in place outside top-k, then outside top-p.

    `top_k` [R] int64 (0 or >= V: off) and `top_p` [R] float (1.0: off). Top-p keeps the
    smallest prefix of the top-k-renormalised distribution whose mass reaches `top_p`, which
    always includes the most likely token.
    """
    vocab_size = logits.shape[1]
    k_on = (top_k > 0) & (top_k < vocab_size)  # [R]
    p_on = top_p < 1.0  # [R]
    # NOTE: "off" k becomes V so every row can index its candidates at position k - 1.
    k = torch.where(k_on, top_k, vocab_size)  # [R]
    groups = ((k_on & ~p_on, False), (p_on, True))
    for in_group, uses_top_p in groups:
        rows = torch.nonzero(in_group).squeeze(1)  # [S]
        if rows.numel() == 0:
            continue
        is_subset = rows.numel() < logits.shape[0]
        sub = logits[rows] if is_subset else logits  # [S, V]
        threshold = _threshold(sub, k[rows], top_p[rows] if uses_top_p else None)  # [S, 1]
        sub.masked_fill_(sub < threshold, float("-inf"))
        if is_subset:
            logits[rows] = sub


def _threshold(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """[S, 1] smallest logit each row of `logits` [S, V] keeps under its `k` [S] and `top_p`."""
    max_k = int(k.max())
    if max_k < logits.shape[1]:
        candidates = logits.topk(max_k, dim=-1).values  # [S, max_k] descending
    else:
        candidates = logits.sort(dim=-1, descending=True).values  # [S, V]
    kth = candidates.gather(1, k.unsqueeze(1) - 1)  # [S, 1]
    if top_p is None:
        return kth
    candidates = candidates.masked_fill(candidates < kth, float("-inf"))
    probs = candidates.softmax(dim=-1)  # [S, max_k] the top-k-renormalised distribution
    # NOTE: shifting the inclusive cumsum (not subtracting probs) keeps it monotone in float,
    # so the kept positions are exactly a prefix and counting them finds the cut-off.
    mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))  # [S, max_k]
    is_kept = mass_before < top_p.unsqueeze(1).to(probs.dtype)  # [S, max_k]
    # NOTE: at least the top token, also when top_p rounds to 0 in float32.
    num_kept = is_kept.sum(dim=-1, keepdim=True).clamp(min=1)  # [S, 1]
    # NOTE: maximum, because rounding can leave the mass short of top_p past the k-th
    # candidate, where every candidate is already -inf.
    return torch.maximum(kth, candidates.gather(1, num_kept - 1))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """Zero, in place, the entries of `probs` [R, V] below `min_p` [R] times their row max.

    The result is not renormalised; the exponential-race sampler is scale-invariant per row.
    """
    threshold = min_p.to(probs.dtype).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [R, 1]
    probs.masked_fill_(probs < threshold, 0.0)
