"""Naive per-row reference implementations used as oracles by the sampler tests.

Plain Python loops over rows and tokens, written for obviousness rather than speed; they
share no code with `ernie_cluster.sample`.
"""

from __future__ import annotations

import math

from ernie_cluster.sample import SamplingState


def make_state(params, prompt=(1, 2, 3), output=(), eos=(0,), sample_index=0) -> SamplingState:
    stops = params.resolve_stop_token_ids(eos)
    state = SamplingState.create(params, list(prompt), stops, sample_index=sample_index)
    state.output_token_ids.extend(output)
    return state


def penalised_row(row: list[float], state: SamplingState) -> list[float]:
    """Penalties and min_tokens applied to one row of raw logits."""
    params = state.params
    out = list(row)
    seen = set(state.prompt_token_ids) | set(state.output_token_ids)
    for token in seen:
        if out[token] > 0:
            out[token] /= params.repetition_penalty
        else:
            out[token] *= params.repetition_penalty
    for token in set(state.output_token_ids):
        count = state.output_token_ids.count(token)
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    if len(state.output_token_ids) < params.min_tokens:
        for token in state.stop_token_ids:
            if token < len(out):
                out[token] = -math.inf
    return out


def allowed_distribution(row: list[float], state: SamplingState) -> dict[int, float]:
    """{token: probability} the sampler should draw from for one penalised row (temp > 0)."""
    params = state.params
    scaled = [x / params.temperature for x in row]
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    kept = order[: params.top_k] if params.top_k > 0 else order
    kept = [t for t in kept if scaled[t] > -math.inf]

    def normalise(tokens: list[int]) -> dict[int, float]:
        top = max(scaled[t] for t in tokens)
        weights = {t: math.exp(scaled[t] - top) for t in tokens}
        total = sum(weights.values())
        return {t: w / total for t, w in weights.items()}

    probs = normalise(kept)
    if params.top_p < 1.0:
        nucleus, mass = [], 0.0
        for token in kept:
            nucleus.append(token)
            mass += probs[token]
            if mass >= params.top_p:
                break
        probs = normalise(nucleus)
    if params.min_p > 0.0:
        largest = max(probs.values())
        probs = normalise([t for t, p in probs.items() if p >= params.min_p * largest])
    return probs
