"""Per-token log-probabilities returned to the user: top alternatives plus the sampled token.

Computed from the raw model logits (before penalties, temperature and truncation), so they
describe the model's distribution rather than the sampling policy. Rows that did not ask for
logprobs cost nothing.
"""

from __future__ import annotations

import torch

from ernie_cluster.sample.sampling_state import SamplingState

TokenLogprobs = dict[int, float]


def gather_logprobs(
    logits: torch.Tensor, states: list[SamplingState], token_ids: torch.Tensor
) -> list[TokenLogprobs | None]:
    """Per row, None or {token_id: logprob} of its top-`params.logprobs` tokens and the
    sampled `token_ids` [B] entry, most likely first (the sampled token last if not a top one).
    """
    result: list[TokenLogprobs | None] = [None] * len(states)
    rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
    if not rows:
        return result
    row_idx = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits[row_idx].float(), dim=-1)  # [L, V]
    sampled_ids = token_ids[row_idx].unsqueeze(1)  # [L, 1]
    sampled = logprobs.gather(1, sampled_ids).squeeze(1).tolist()  # [L]
    max_top = min(max(states[i].params.logprobs or 0 for i in rows), logits.shape[1])
    top_values, top_ids = logprobs.topk(max_top, dim=-1)  # [L, max_top]
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    sampled_id_list = sampled_ids.squeeze(1).tolist()

    for j, i in enumerate(rows):
        num_top = states[i].params.logprobs or 0
        entry = dict(zip(top_ids_list[j][:num_top], top_values_list[j][:num_top], strict=True))
        entry.setdefault(sampled_id_list[j], sampled[j])
        result[i] = entry
    return result
