"""End-to-end tests of `Sampler` against naive references and statistical oracles."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sample_reference import allowed_distribution, make_state, penalised_row

from ernie_cluster.sample import Sampler, SamplerOutput, SamplingState
from ernie_cluster.sampling_params import SamplingParams

VOCAB = 64


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sample_ids(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    return Sampler()(logits, states).to_host()[0]


def test_greedy_equals_argmax():
    logits = random_logits(8)
    states = [make_state(SamplingParams(temperature=0.0)) for _ in range(8)]
    out = Sampler()(logits, states)
    assert isinstance(out, SamplerOutput)
    # The runner broadcasts token_ids across ranks before copying them to the host.
    assert out.token_ids.dtype == torch.int64 and out.token_ids.is_contiguous()
    assert out.token_ids.shape == (8,) and out.token_ids.device == logits.device
    assert out.to_host() == (logits.argmax(dim=-1).tolist(), [None] * 8)


def test_greedy_ties_pick_lowest_id():
    logits = torch.zeros(1, VOCAB)
    logits[0, [7, 3, 40]] = 5.0
    assert sample_ids(logits, [make_state(SamplingParams(temperature=0.0))]) == [3]


def test_greedy_with_penalties_matches_reference():
    gen = torch.Generator().manual_seed(1)
    batch = 16
    logits = random_logits(batch, seed=2)
    states = []
    for i in range(batch):
        params = SamplingParams(
            temperature=0.0,
            repetition_penalty=[1.0, 1.3, 0.7, 2.0][i % 4],
            frequency_penalty=[0.0, 0.5, -0.4, 2.0][(i // 4) % 4],
            presence_penalty=[0.0, -1.0, 1.5, 0.3][(i + 1) % 4],
        )
        prompt = torch.randint(
            0, VOCAB, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen
        ).tolist()
        output = torch.randint(0, VOCAB, (i,), generator=gen).tolist()
        states.append(make_state(params, prompt=prompt, output=output))
    token_ids = sample_ids(logits, states)
    for i, state in enumerate(states):
        row = penalised_row(logits[i].tolist(), state)
        assert token_ids[i] == max(range(VOCAB), key=lambda t: (row[t], -t)), i


def test_penalties_change_the_greedy_choice():
    # Token 5 leads before penalties; a repeated 5 in the output must hand the lead to 6.
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 3.0, 2.5
    for params in (
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, frequency_penalty=0.3),
        SamplingParams(temperature=0.0, presence_penalty=0.6),
    ):
        state = make_state(params, prompt=[1], output=[5, 5])
        assert sample_ids(logits, [state]) == [6], params


def test_does_not_mutate_logits_or_states():
    logits = random_logits(4)
    before_logits = logits.clone()
    states = [
        make_state(
            SamplingParams(temperature=0.0, repetition_penalty=1.5, min_tokens=5), output=[4, 4]
        ),
        make_state(SamplingParams(temperature=0.8, top_p=0.5, seed=3, logprobs=2)),
        make_state(SamplingParams(temperature=1.0, top_k=3, frequency_penalty=1.0), output=[9]),
        make_state(SamplingParams(temperature=1.0, min_p=0.2)),
    ]
    snapshot = [
        (
            copy.deepcopy(s.params),
            list(s.prompt_token_ids),
            list(s.output_token_ids),
            s.stop_token_ids,
        )
        for s in states
    ]
    Sampler()(logits, states)
    assert torch.equal(logits, before_logits)
    after = [(s.params, s.prompt_token_ids, s.output_token_ids, s.stop_token_ids) for s in states]
    assert after == snapshot


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 10.0  # eos
    logits[0, 9] = 9.0  # user stop id
    logits[0, 20] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    pending = make_state(params, output=[1, 2])
    assert pending.stop_token_ids == frozenset({0, 9})
    assert sample_ids(logits, [pending]) == [20]
    assert sample_ids(logits, [make_state(params, output=[1, 2, 3])]) == [0]


def test_min_tokens_masks_stop_ids_when_sampling():
    torch.manual_seed(0)
    logits = torch.zeros(4096, 8)
    logits[:, 0] = 2.0
    params = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[3, 1000])
    states = [make_state(params) for _ in range(4096)]
    tokens = set(sample_ids(logits, states))
    assert tokens == {1, 2, 4, 5, 6, 7}


def test_ignore_eos_keeps_user_stop_ids_only():
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9], ignore_eos=True)
    state = make_state(params, eos=(0, 2))
    assert state.stop_token_ids == frozenset({9})
    logits = torch.zeros(1, VOCAB)
    logits[0, 9], logits[0, 0] = 10.0, 9.0
    # eos is no stop id any more, so min_tokens masks only 9 and eos may be sampled.
    assert sample_ids(logits, [state]) == [0]


def test_mixed_batch_greedy_rows_unaffected():
    logits = random_logits(6, seed=5)
    states = [
        make_state(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=4))
        for i in range(6)
    ]
    assert sample_ids(logits, states)[0::2] == logits[0::2].argmax(dim=-1).tolist()


def test_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="num_states=2"):
        Sampler()(torch.zeros(3, VOCAB), [make_state(SamplingParams())] * 2)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=0.9, top_k=10, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=1.5, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.4, frequency_penalty=0.5),
    ],
    ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}-r{p.repetition_penalty}",
)
def test_sample_distribution_matches_reference(params: SamplingParams):
    num_draws = 40_000
    row = random_logits(1, vocab=32, seed=7)[0]
    state = make_state(params, prompt=[0, 1, 2], output=[2, 3, 3])
    expected = allowed_distribution(penalised_row(row.tolist(), state), state)

    torch.manual_seed(1234)
    # Every row is the same request: one call gives num_draws independent draws.
    tokens = sample_ids(row.expand(num_draws, -1), [state] * num_draws)
    counts = torch.bincount(torch.tensor(tokens), minlength=32).tolist()

    support = {t for t, c in enumerate(counts) if c}
    assert support <= set(expected), support - set(expected)
    chi_square = sum(
        (counts[t] - num_draws * p) ** 2 / (num_draws * p) for t, p in expected.items()
    )
    dof = max(len(expected) - 1, 1)
    # A loose bound, about five standard deviations of the chi-square law above its mean.
    assert chi_square < dof + 5 * math.sqrt(2 * dof), (chi_square, dof)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits(16, seed=11)
    states = [
        make_state(
            SamplingParams(temperature=2.0, top_k=1 if i % 2 else 0, top_p=1.0 if i % 2 else 1e-6)
        )
        for i in range(16)
    ]
    assert sample_ids(logits, states) == logits.argmax(dim=-1).tolist()


def run_steps(states, target: int, logits_for_step, num_steps: int = 20) -> list[int]:
    """Sample `num_steps` steps, appending each token; return the tokens of states[target]."""
    sampler = Sampler()
    tokens = []
    for step in range(num_steps):
        token_ids, _ = sampler(logits_for_step(step, len(states), target), states).to_host()
        for state, token in zip(states, token_ids, strict=True):
            state.output_token_ids.append(token)
        tokens.append(token_ids[target])
    return tokens


def test_seeded_row_independent_of_batch_and_position():
    target_params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, repetition_penalty=1.1)

    def logits_for_step(step: int, batch: int, target: int) -> torch.Tensor:
        logits = random_logits(batch, vocab=512, seed=1000 + step + batch)
        logits[target] = random_logits(1, vocab=512, seed=step)[0]
        return logits

    alone = run_steps([make_state(target_params)], 0, logits_for_step)

    others = [
        make_state(SamplingParams(temperature=0.7)),
        make_state(SamplingParams(temperature=1.2, top_k=5, seed=7)),
        make_state(SamplingParams(temperature=0.0)),
        make_state(SamplingParams(temperature=1.0, min_p=0.3, seed=42), sample_index=1),
        make_state(SamplingParams(temperature=1.0, frequency_penalty=1.0)),
    ]
    batch = [*others[:3], make_state(target_params), *others[3:]]
    torch.manual_seed(99)
    in_batch = run_steps(batch, 3, logits_for_step)
    assert in_batch == alone
    assert len(set(alone)) > 5  # really sampled, not a constant sequence


def test_seeded_sequences_repeat_and_unseeded_default_rng_is_shared():
    def logits_for_step(step: int, batch: int, target: int) -> torch.Tensor:
        return random_logits(batch, vocab=256, seed=step)

    params = SamplingParams(temperature=1.0, seed=5)
    first = run_steps([make_state(params)], 0, logits_for_step)
    second = run_steps([make_state(params)], 0, logits_for_step)
    assert first == second

    unseeded = SamplingParams(temperature=1.0)
    torch.manual_seed(3)
    a = run_steps([make_state(unseeded)], 0, logits_for_step)
    torch.manual_seed(3)
    b = run_steps([make_state(unseeded)], 0, logits_for_step)
    assert a == b


def test_n_children_draw_different_sequences():
    params = SamplingParams(n=4, temperature=1.0, seed=123)

    def logits_for_step(step: int, batch: int, target: int) -> torch.Tensor:
        return random_logits(1, vocab=1000, seed=step).expand(batch, -1)

    states = [make_state(params, sample_index=i) for i in range(4)]
    run_steps(states, 0, logits_for_step)
    sequences = [tuple(s.output_token_ids) for s in states]
    assert len(set(sequences)) == 4

    again = [make_state(params, sample_index=i) for i in range(4)]
    run_steps(again, 0, logits_for_step)
    assert [tuple(s.output_token_ids) for s in again] == sequences


@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_logprobs_are_raw_log_softmax(num_top: int):
    logits = random_logits(3, seed=21)
    states = [
        make_state(
            SamplingParams(temperature=1.0, logprobs=num_top, repetition_penalty=3.0, top_k=8),
            prompt=list(range(VOCAB)),
        ),
        make_state(SamplingParams(temperature=0.0)),
        make_state(
            SamplingParams(temperature=0.0, logprobs=num_top, frequency_penalty=2.0),
            output=logits[2].topk(3).indices.tolist(),
        ),
    ]
    token_ids, logprobs = Sampler()(logits, states).to_host()
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[1] is None
    for row in (0, 2):
        entry = logprobs[row]
        sampled = token_ids[row]
        top_ids = reference[row].topk(num_top).indices.tolist()
        assert sampled in entry
        assert list(entry)[:num_top] == top_ids
        assert set(entry) == set(top_ids) | {sampled}
        assert len(entry) == num_top + (sampled not in top_ids)
        for token, value in entry.items():
            assert value == pytest.approx(reference[row, token].item(), abs=1e-5)
    # Row 2's penalties moved the greedy pick off the raw argmax; logprobs still say raw.
    assert token_ids[2] != logits[2].argmax().item()


def test_tiny_temperature_is_greedy_not_nan():
    logits = random_logits(4, seed=31)
    states = [make_state(SamplingParams(temperature=1e-40, top_p=0.5)) for _ in range(4)]
    assert sample_ids(logits, states) == logits.argmax(dim=-1).tolist()


def test_state_built_without_create_is_penalised_from_its_lists():
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    state = SamplingState(params, [5], [], frozenset(), None)  # no cached prompt tensor
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 2.0, 1.0
    assert sample_ids(logits, [state]) == [6]


def test_logprobs_for_a_subset_of_rows_and_more_than_the_vocabulary():
    # Two of four rows ask, one for more alternatives than the 5-token vocabulary has.
    logits = random_logits(4, vocab=5, seed=41)
    states = [
        make_state(SamplingParams(temperature=0.0)),
        make_state(SamplingParams(temperature=1.0, logprobs=20, seed=1)),
        make_state(SamplingParams(temperature=1.0)),
        make_state(SamplingParams(temperature=0.0, logprobs=2)),
    ]
    token_ids, logprobs = Sampler()(logits, states).to_host()
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[0] is None and logprobs[2] is None
    assert list(logprobs[1]) == reference[1].argsort(descending=True).tolist()
    top_two = reference[3].topk(2).indices.tolist()
    assert list(logprobs[3])[:2] == top_two and token_ids[3] == top_two[0]
    for row in (1, 3):
        for token, value in logprobs[row].items():
            assert value == pytest.approx(reference[row, token].item(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_argmax_ties_and_nan_included(dtype):
    """The CPU greedy pick (torch.max's index) is torch.argmax's: the first maximum of a row,
    NaN counted as the maximum."""
    from ernie_cluster.sample.sampler import first_argmax

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32000, generator=gen).to(dtype)
    logits[:8, 100] = logits[:8, 20000] = 50.0  # ties: the first wins
    logits[8, [5, 7]] = float("nan")
    logits[9] = 0.0
    got = first_argmax(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got[:8].tolist() == [100] * 8 and got[8] == 5 and got[9] == 0
