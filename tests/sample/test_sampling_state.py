"""Tests of `SamplingState.create`: stop ids, generators and seed derivation."""

from __future__ import annotations

import torch

from ernie_cluster.sample import SamplingState
from ernie_cluster.sample.sampling_state import derive_seed
from ernie_cluster.sampling_params import SamplingParams


def test_stop_ids_are_the_resolved_set_as_given():
    state = SamplingState.create(SamplingParams(stop_token_ids=[5, 6]), [1, 2], [2, 3, 5, 6])
    assert state.stop_token_ids == frozenset({2, 3, 5, 6})
    assert state.output_token_ids == []
    assert state.prompt_token_ids == [1, 2]
    assert state.generator is None


def test_the_stop_set_includes_eos_and_user_ids_unless_eos_is_ignored():
    params = SamplingParams(stop_token_ids=[5, 6])
    assert params.resolve_stop_token_ids([2, 3]) == frozenset({2, 3, 5, 6})
    params = SamplingParams(stop_token_ids=[5], ignore_eos=True)
    assert params.resolve_stop_token_ids([2, 3]) == frozenset({5})


def test_first_child_uses_the_seed_itself():
    state = SamplingState.create(SamplingParams(seed=1234), [1], [0])
    assert state.generator is not None
    assert state.generator.initial_seed() == 1234
    reference = torch.Generator().manual_seed(1234)
    assert torch.equal(
        torch.empty(16).exponential_(generator=state.generator),
        torch.empty(16).exponential_(generator=reference),
    )


def test_children_seeds_distinct_and_deterministic():
    seeds = [derive_seed(7, i) for i in range(64)]
    assert len(set(seeds)) == 64
    assert seeds == [derive_seed(7, i) for i in range(64)]
    states = [
        SamplingState.create(SamplingParams(seed=7), [1], [0], sample_index=i) for i in range(4)
    ]
    assert [s.generator.initial_seed() for s in states] == seeds[:4]


def test_any_python_int_seed_is_accepted():
    for seed in (-1, 0, 2**63, 2**64 + 5, -(2**70)):
        state = SamplingState.create(SamplingParams(seed=seed), [1], [0], sample_index=1)
        assert 0 <= state.generator.initial_seed() < 2**64
    negative = SamplingState.create(SamplingParams(seed=-1), [1], [0])
    assert negative.generator.initial_seed() == 2**64 - 1


def test_prompt_tensor_cached_only_for_repetition_penalty():
    plain = SamplingState.create(SamplingParams(), [4, 5], [0])
    assert plain.prompt_ids_tensor is None
    penalised = SamplingState.create(SamplingParams(repetition_penalty=1.2), [4, 5], [0])
    assert penalised.prompt_ids_tensor.tolist() == [4, 5]
