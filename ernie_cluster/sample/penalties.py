"""History-dependent logit edits: repetition/frequency/presence penalties and min_tokens.

Both edit a working copy of the logits in place and only touch the rows that ask for them.
Counts are built by scattering padded token-id tensors into a [rows, V + 1] buffer whose
extra column swallows the padding. Never samples and never mutates a `SamplingState`.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ernie_cluster.sample.sampling_state import SamplingState
from ernie_cluster.sampling_params import SamplingParams


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Penalise `logits` [B, V] in place for the rows whose params enable a penalty.

    Repetition penalty (tokens seen in prompt or output) is applied first, then the OpenAI
    frequency/presence terms over output tokens only.
    """
    rows = [i for i, state in enumerate(states) if has_penalties(state.params)]
    if not rows:
        return
    device, vocab_size = logits.device, logits.shape[1]
    row_idx = torch.tensor(rows, device=device)
    picked = [states[i] for i in rows]
    sub = logits[row_idx]  # [P, V]

    output_counts = _output_counts(picked, vocab_size, sub.dtype, device)  # [P, V]
    output_seen = output_counts > 0  # [P, V]

    repetition = [s.params.repetition_penalty for s in picked]
    if any(r != 1.0 for r in repetition):
        penalty = torch.tensor(repetition, dtype=sub.dtype, device=device).unsqueeze(1)  # [P, 1]
        seen = _prompt_seen(picked, vocab_size, device) | output_seen  # [P, V]
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)  # [P, V]
        sub = torch.where(seen, penalised, sub)

    frequency = [s.params.frequency_penalty for s in picked]
    if any(f != 0.0 for f in frequency):
        scale = torch.tensor(frequency, dtype=sub.dtype, device=device).unsqueeze(1)  # [P, 1]
        sub -= scale * output_counts
    presence = [s.params.presence_penalty for s in picked]
    if any(p != 0.0 for p in presence):
        scale = torch.tensor(presence, dtype=sub.dtype, device=device).unsqueeze(1)  # [P, 1]
        sub -= scale * output_seen.to(sub.dtype)
    logits[row_idx] = sub


def apply_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Set stop-id logits to -inf in place for rows that have not reached `min_tokens`."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, state in enumerate(states):
        if state.is_min_tokens_pending:
            # NOTE: user stop ids beyond the vocabulary can never be sampled; skip them.
            ids = [t for t in state.stop_token_ids if t < vocab_size]
            rows.extend([i] * len(ids))
            cols.extend(ids)
    if rows:
        index = (
            torch.tensor(rows, device=logits.device),
            torch.tensor(cols, device=logits.device),
        )
        logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))


def _output_counts(
    states: list[SamplingState], vocab_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    max_len = max(len(s.output_token_ids) for s in states)
    padded = [
        s.output_token_ids + [vocab_size] * (max_len - len(s.output_token_ids)) for s in states
    ]
    ids = torch.tensor(padded, dtype=torch.int64, device=device)  # [P, L]
    counts = torch.zeros(len(states), vocab_size + 1, dtype=dtype, device=device)  # [P, V + 1]
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]


def _prompt_seen(
    states: list[SamplingState], vocab_size: int, device: torch.device
) -> torch.Tensor:
    prompts = [
        s.prompt_ids_tensor.to(device)
        if s.prompt_ids_tensor is not None
        else torch.tensor(s.prompt_token_ids, dtype=torch.int64, device=device)
        for s in states
    ]
    ids = pad_sequence(prompts, batch_first=True, padding_value=vocab_size)  # [P, L]
    seen = torch.zeros(len(states), vocab_size + 1, dtype=torch.bool, device=device)  # [P, V + 1]
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]
