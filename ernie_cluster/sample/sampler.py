"""Sampler: turns one step's logits [B, V] into one token per request, plus logprobs.

Data path: raw logits -> logprobs (raw) ; working copy -> penalties -> min_tokens mask ->
greedy argmax | temperature -> top-k/top-p -> softmax -> min-p -> exponential race.
Works on the whole batch with per-row parameter tensors and skips stages no row needs.
Never mutates the logits it is given or any `SamplingState`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie_cluster.sample.logprobs import TokenLogprobs, gather_logprobs
from ernie_cluster.sample.penalties import apply_min_tokens, apply_penalties, has_penalties
from ernie_cluster.sample.sampling_state import SamplingState
from ernie_cluster.sample.top_k_top_p import apply_min_p, apply_top_k_top_p

# NOTE: below this, logits / temperature can overflow float32 and softmax turns into NaN;
# such temperatures are indistinguishable from greedy anyway.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """[B] one sampled token per row, in `states` order."""
    logprobs: list[TokenLogprobs | None]
    """[B] None where `params.logprobs` is None, else {token_id: logprob} of the top
    `params.logprobs` tokens plus the sampled token, from the raw logits."""


class Sampler:
    """Stateless; all per-request state lives in the `SamplingState`s passed per call."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [num_states={len(states)}, vocab], got {tuple(logits.shape)}"
            )
        working = logits
        needs_penalties = any(has_penalties(s.params) for s in states)
        needs_min_tokens = any(s.is_min_tokens_pending for s in states)
        if needs_penalties or needs_min_tokens:
            working = logits.clone()  # [B, V]
            apply_penalties(working, states)
            apply_min_tokens(working, states)

        is_random = [s.params.temperature >= _MIN_TEMPERATURE for s in states]
        if all(is_random):
            token_ids = self._sample_random(working, states)  # [B]
        else:
            token_ids = working.argmax(dim=-1)  # [B]
            if any(is_random):
                rows = [i for i, r in enumerate(is_random) if r]
                row_idx = torch.tensor(rows, device=logits.device)
                token_ids[row_idx] = self._sample_random(
                    working[row_idx], [states[i] for i in rows]
                )

        return SamplerOutput(
            token_ids=token_ids.tolist(),
            logprobs=gather_logprobs(logits, states, token_ids),
        )

    def _sample_random(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Sample one token per row of `logits` [R, V]; no state here is treated as greedy."""
        device = logits.device
        params = [s.params for s in states]
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
        scaled = logits / temperature.to(device).unsqueeze(1)  # [R, V] fresh copy, safe to edit

        if any(0 < p.top_k < logits.shape[1] or p.top_p < 1.0 for p in params):
            vocab = logits.shape[1]  # a top_k past the vocabulary is "off" (and fits int64)
            top_k = torch.tensor(
                [min(p.top_k, vocab) for p in params], dtype=torch.int64, device=device
            )
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            apply_top_k_top_p(scaled, top_k, top_p)

        probs = scaled.softmax(dim=-1)  # [R, V]
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            apply_min_p(probs, min_p)

        noise = _exponential_noise(states, probs.shape[1], probs.dtype, device)  # [R, V]
        # NOTE: argmax(p / E) with E ~ Exp(1) picks token t with probability p_t (the
        # exponential race), so the noise draw alone decides the token: no cumsum/multinomial.
        return probs.div_(noise).argmax(dim=-1)  # [R]


def _exponential_noise(
    states: list[SamplingState], vocab_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[R, V] Exp(1) noise: one V-sized draw per seeded row from its own generator, so its
    token does not depend on batch composition; unseeded rows share one default-RNG draw."""
    seeded = [i for i, s in enumerate(states) if s.generator is not None]
    # NOTE: uniform draws turned into Exp(1) by -log(1 - u) (inverse CDF), in place: 3-6x
    # faster on CPU than Tensor.exponential_, which dominated a sampled step at large B x V.
    if not seeded:
        noise = torch.rand(len(states), vocab_size, dtype=dtype, device=device)  # [R, V]
    else:
        noise = torch.empty(len(states), vocab_size, dtype=dtype, device=device)
        unseeded = [i for i, s in enumerate(states) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.rand(len(unseeded), vocab_size, dtype=dtype, device=device)
        for i in seeded:
            noise[i].uniform_(generator=states[i].generator)
    noise.neg_().log1p_().neg_()
    # NOTE: an Exp(1) draw can be exactly 0; dividing by it would let a zero-probability
    # (truncated) token win via 0/0 = NaN or p/0 = inf.
    return noise.clamp_min_(torch.finfo(dtype).tiny)
