"""Direct tests of the logit edits (penalties, min_tokens, top-k/top-p, min-p) vs references."""

from __future__ import annotations

import math

import pytest
import torch
from sample_reference import allowed_distribution, make_state, penalised_row

from ernie_cluster.sample.penalties import MinTokens, Penalties
from ernie_cluster.sample.top_k_top_p import TopKTopP, apply_min_p
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.worker.step_upload import StepUpload

VOCAB = 48


def penalise(logits: torch.Tensor, states) -> None:
    """Plan penalties and min_tokens on the host, upload once, apply in place."""
    upload = StepUpload()
    vocab_size = logits.shape[1]
    plans = [
        Penalties.plan(states, vocab_size, logits.device, upload),
        MinTokens.plan(states, vocab_size, upload),
    ]
    upload.send(logits.device)
    for plan in plans:
        if plan is not None:
            plan.apply(logits, upload)


def truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    upload = StepUpload()
    plan = TopKTopP.plan(top_k, top_p, logits.shape[1], upload)
    upload.send(logits.device)
    if plan is not None:
        plan.apply(logits, upload)


def random_states(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for i in range(batch):
        params = SamplingParams(
            temperature=1.0,
            repetition_penalty=[1.0, 1.3, 0.6, 2.0, 1.0][i % 5],
            frequency_penalty=[0.0, 0.5, -0.4, 2.0][i % 4],
            presence_penalty=[0.0, -1.0, 1.5][i % 3],
            min_tokens=[0, 3, 10][i % 3],
            stop_token_ids=[7, VOCAB + 3],
        )
        prompt = torch.randint(0, VOCAB, (1 + i % 7,), generator=gen).tolist()
        output = torch.randint(0, VOCAB, (i % 9,), generator=gen).tolist()
        states.append(make_state(params, prompt=prompt, output=output))
    return states


def test_penalties_and_min_tokens_match_reference():
    states = random_states(24, seed=0)
    logits = torch.randn(24, VOCAB, generator=torch.Generator().manual_seed(1)) * 4
    working = logits.clone()
    penalise(working, states)
    expected = torch.tensor([penalised_row(logits[i].tolist(), s) for i, s in enumerate(states)])
    torch.testing.assert_close(working, expected)


def test_prompts_on_device_and_from_host_lists_mix():
    # Rows whose prompt tensor is missing are penalised from their lists, in the same batch.
    states = random_states(24, seed=5)
    for state in states[::3]:
        state.prompt_ids_tensor = None
    logits = torch.randn(24, VOCAB, generator=torch.Generator().manual_seed(6)) * 4
    working = logits.clone()
    penalise(working, states)
    expected = torch.tensor([penalised_row(logits[i].tolist(), s) for i, s in enumerate(states)])
    torch.testing.assert_close(working, expected)


def test_ids_beyond_the_vocabulary_touch_no_other_row():
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0)
    state = make_state(params, prompt=[VOCAB + 5], output=[3, VOCAB, VOCAB + 7])
    state.prompt_ids_tensor = None
    # Has seen nothing inside the vocabulary: no token of it may be penalised.
    blind = make_state(SamplingParams(repetition_penalty=2.0), prompt=[VOCAB + 1])
    blind.prompt_ids_tensor = None
    states = [state, make_state(params, output=[3]), blind]
    logits = torch.ones(3, VOCAB)
    penalise(logits, states)
    assert logits[1, 0] == 1.0 and logits[1, 3] == 1.0 / 2.0 - 1.0
    assert logits[0, 3] == 1.0 / 2.0 - 1.0
    assert (logits[0, 4:] == 1.0).all() and (logits[1, 4:] == 1.0).all()
    assert (logits[2] == 1.0).all()


def test_rows_without_penalties_are_untouched():
    states = [make_state(SamplingParams(), output=[1, 1, 2]) for _ in range(3)]
    states[1] = make_state(SamplingParams(frequency_penalty=1.0), output=[1, 1, 2])
    logits = torch.randn(3, VOCAB)
    working = logits.clone()
    penalise(working, states)
    assert torch.equal(working[[0, 2]], logits[[0, 2]])
    assert working[1, 1] == logits[1, 1] - 2.0


def reference_kept(row: list[float], top_k: int, top_p: float) -> set[int]:
    state = make_state(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
    return set(allowed_distribution(row, state))


def test_top_k_top_p_keep_exactly_the_reference_sets():
    settings = [
        (0, 1.0),
        (5, 1.0),
        (1, 1.0),
        (0, 0.5),
        (0, 0.9),
        (12, 0.7),
        (3, 0.01),
        (VOCAB, 1.0),
    ]
    logits = torch.randn(len(settings), VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    masked = logits.clone()
    truncate(masked, [k for k, _ in settings], [p for _, p in settings])
    for i, (k, p) in enumerate(settings):
        kept = set(torch.nonzero(masked[i] > -math.inf).squeeze(1).tolist())
        assert kept == reference_kept(logits[i].tolist(), k, p), (k, p)
        assert torch.equal(masked[i, list(kept)], logits[i, list(kept)])


def test_top_k_only_path_matches_reference():
    # No row asks for top-p, so the topk (not sort) path runs; a subset of rows is filtered.
    ks = [0, 4, 1, 0, 30]
    logits = torch.randn(len(ks), VOCAB, generator=torch.Generator().manual_seed(4))
    masked = logits.clone()
    truncate(masked, ks, [1.0] * len(ks))
    for i, k in enumerate(ks):
        kept = set(torch.nonzero(masked[i] > -math.inf).squeeze(1).tolist())
        assert kept == reference_kept(logits[i].tolist(), k, 1.0)


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03], [0.2, 0.2, 0.2, 0.2, 0.2]])
    original = probs.clone()
    apply_min_p(probs, torch.tensor([0.2, 0.9]))
    assert (probs > 0).tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert torch.equal(probs[probs > 0], original[probs > 0])


def test_filters_off_plan_nothing():
    upload = StepUpload()
    assert TopKTopP.plan([0, VOCAB, VOCAB + 9], [1.0, 1.0, 1.0], VOCAB, upload) is None
    assert upload.is_empty


@pytest.mark.parametrize("with_top_p_neighbour", [False, True])
def test_top_p_boundary_rounding_and_ties(with_top_p_neighbour: bool):
    logits = torch.full((4, VOCAB), float("-inf"))
    # Probabilities exactly 0.5, 0.25, 0.125, 0.125: mass 0.75 is reached with two tokens.
    logits[0, :4] = torch.tensor([math.log(4.0), math.log(2.0), 0.0, 0.0])
    logits[1] = torch.linspace(-1.0, 0.0, VOCAB)
    logits[1, 0] = 30.0  # the top token's probability rounds to exactly 1.0 in float32
    logits[2, :3] = 5.0  # a three-way tie at the top-2 cut-off is kept whole
    logits[3] = logits[0]
    # Row 3 has top-k and top-p, so it puts the top-k-only rows 1 and 2 on its top-p path.
    top_p_3 = 0.75 if with_top_p_neighbour else 1.0
    masked = logits.clone()
    truncate(masked, [0, 3, 2, 4], [0.75, 1.0, 1.0, top_p_3])
    # Row 1 must keep its 3 top-k tokens although its top token alone has all the mass.
    expected = [2, 3, 3, 2 if with_top_p_neighbour else 4]
    assert (masked > -math.inf).sum(dim=-1).tolist() == expected
