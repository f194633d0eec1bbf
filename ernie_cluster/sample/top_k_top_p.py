"""Truncation of temperature-scaled logits: top-k, top-p (nucleus) and min-p.

Each filter becomes a per-row logit threshold, so tokens tied with the last kept one are
kept too. The row groups are decided on the host from the parameters: rows with a top-k
need only their group's `torch.topk` candidates; rows with top-p alone are sorted over the
whole vocabulary. Rows with both filters off are not touched. Never reads a device tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ernie_cluster.worker.step_upload import Slot, StepUpload


@dataclass(frozen=True)
class _Group:
    """Rows that share one candidate computation: a topk of the largest k, or a full sort."""

    rows: Slot | None
    """[S] rows of the logits in this group; None: every row."""
    k: Slot
    """[S] per-row k, the vocabulary size where top-k is off."""
    top_p: Slot | None
    """[S] per-row top-p, inf where off; None when no row of the group has one."""
    num_candidates: int
    """The group's largest k: how many sorted logits each row needs (all of them at V)."""


@dataclass(frozen=True)
class TopKTopP:
    """Host plan of the top-k/top-p filters of a batch; `apply` runs it on the device."""

    groups: tuple[_Group, ...]

    @classmethod
    def plan(
        cls, top_k: list[int], top_p: list[float], vocab_size: int, upload: StepUpload
    ) -> TopKTopP | None:
        """Plan for rows with `top_k` (0 or >= V: off) and `top_p` (1.0: off); None when
        every filter is off. Registers the groups' rows and parameters with `upload`."""
        # NOTE: "off" k becomes V so every row can index its candidates at position k - 1.
        k = [tk if 0 < tk < vocab_size else vocab_size for tk in top_k]
        with_k = [i for i, ki in enumerate(k) if ki < vocab_size]
        p_only = [
            i
            for i, (ki, p) in enumerate(zip(k, top_p, strict=True))
            if ki == vocab_size and p < 1.0
        ]
        groups = []
        for rows in (with_k, p_only):
            if not rows:
                continue
            group_k = [k[i] for i in rows]
            group_p = [top_p[i] for i in rows]
            uses_top_p = any(p < 1.0 for p in group_p)
            groups.append(
                _Group(
                    rows=None if len(rows) == len(k) else upload.ints(rows),
                    k=upload.ints(group_k),
                    # NOTE: an "off" top_p becomes inf, so a top-k-only row beside top-p rows
                    # keeps all its candidates.
                    top_p=upload.floats([p if p < 1.0 else math.inf for p in group_p])
                    if uses_top_p
                    else None,
                    num_candidates=max(group_k),
                )
            )
        return cls(tuple(groups)) if groups else None

    def apply(self, logits: torch.Tensor, upload: StepUpload) -> None:
        """Set `logits` [R, V] to -inf in place outside top-k, then outside top-p.

        Top-p keeps the smallest prefix of the top-k-renormalised distribution whose mass
        reaches `top_p`, which always includes the most likely token.
        """
        for group in self.groups:
            rows = None if group.rows is None else upload[group.rows]  # [S]
            sub = logits if rows is None else logits.index_select(0, rows)  # [S, V]
            top_p = None if group.top_p is None else upload[group.top_p]
            threshold = _threshold(sub, upload[group.k], top_p, group.num_candidates)  # [S, 1]
            sub.masked_fill_(sub < threshold, float("-inf"))
            if rows is not None:
                logits.index_copy_(0, rows, sub)


def _threshold(
    logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor | None, num_candidates: int
) -> torch.Tensor:
    """[S, 1] smallest logit each row of `logits` [S, V] keeps under its `k` [S] and `top_p`;
    `num_candidates` is max(k), known on the host."""
    if num_candidates < logits.shape[1]:
        candidates = logits.topk(num_candidates, dim=-1).values  # [S, max_k] descending
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
