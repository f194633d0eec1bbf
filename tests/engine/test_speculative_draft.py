"""`draft_model` speculative decoding end to end on the tiny checkpoint: greedy tokens equal
transformers' and logprobs equal the plain run's, under chunked prefill and KV pressure, with
output constraints, at W = 1 and TP2/EP2. Three drafts: the target itself, whose proposals are
the target's own greedy tokens (so acceptance near 1 proves the draft runs and its cache
mirrors the target's: a draft reading stale or foreign KV proposes other tokens), a smaller
random checkpoint of the same vocabulary, and a dense `ernie4_5` one (the `tiny-dense` preset,
as ERNIE-4.5-0.3B drafts for the 21B): acceptance low, outputs still exact. The dense
checkpoint drafting for itself pins the dense model's draft path the same way."""

from __future__ import annotations

import json
import random

import pytest
import torch
from engine_helpers import random_prompts
from hf_reference import hf_greedy
from test_speculative import (
    PRESSURE,
    assert_same_logprobs,
    constrained,
    copy_heavy_prompts,
    greedy,
    greedy_reference,
)

from ernie_cluster import LLM
from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint


def draft_spec(model, k: int = 4, **extra) -> dict:
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": k, **extra}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return greedy_reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """Half the layers, half the width, one kv head; the tiny vocabulary, other weights."""
    overrides = {"num_hidden_layers": 2, "hidden_size": 32, "num_key_value_heads": 1}
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("draft"), preset="tiny", seed=3, overrides=overrides
    )


@pytest.fixture(scope="module")
def dense_draft(tmp_path_factory):
    """A dense `ernie4_5` checkpoint with the tiny vocabulary and tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense"), preset="tiny-dense", seed=3)


@pytest.mark.parametrize("draft", ["self", "small", "dense"])
def test_greedy_matches_transformers_and_the_plain_run(
    draft, reference, tiny_checkpoint, small_draft, dense_draft
):
    prompts, max_tokens, expected = reference
    # NOTE: the random drafts are nearly always wrong: min_acceptance 0 keeps them proposing k.
    spec = (
        draft_spec(tiny_checkpoint)
        if draft == "self"
        else draft_spec({"small": small_draft, "dense": dense_draft}[draft], min_acceptance=0)
    )
    outputs, stats = greedy(tiny_checkpoint, prompts, max_tokens, spec, **PRESSURE)
    for i, output in enumerate(outputs):
        assert output.token_ids == expected[i], f"prompt {i}"
    plain, _ = greedy(tiny_checkpoint, prompts, max_tokens, **PRESSURE)
    assert_same_logprobs(outputs, plain)
    assert stats.num_preemptions > 0
    counters = stats.spec_decode
    assert counters.num_draft_tokens > 100
    if draft == "self":
        # Only a float tie decided differently by the one-token and the verify path may fail.
        assert counters.acceptance_rate > 0.97, counters
        assert counters.mean_accepted_length > 3
    else:
        assert counters.acceptance_rate < 0.3, counters


def test_a_dense_checkpoint_drafts_for_itself(dense_draft):
    """The dense model as target and draft: tokens equal transformers' Ernie4_5ForCausalLM,
    and acceptance near 1 shows the draft runner computes what the dense target does."""
    from transformers import Ernie4_5ForCausalLM

    hf = Ernie4_5ForCausalLM.from_pretrained(dense_draft, dtype=torch.float32).eval()
    rng = random.Random(2)
    prompts = copy_heavy_prompts(4, seed=2) + random_prompts(6, 512, seed=2, lengths=(1, 200))
    max_tokens = [rng.randint(16, 48) for _ in prompts]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    spec = draft_spec(dense_draft)
    outputs, stats = greedy(dense_draft, prompts, max_tokens, spec, **PRESSURE)
    assert [o.token_ids for o in outputs] == expected
    plain, _ = greedy(dense_draft, prompts, max_tokens, **PRESSURE)
    assert_same_logprobs(outputs, plain)
    assert stats.spec_decode.num_draft_tokens > 50
    assert stats.spec_decode.acceptance_rate > 0.97, stats.spec_decode


@pytest.mark.slow
def test_greedy_with_the_default_settings_and_a_small_budget(reference, tiny_checkpoint):
    """The default engine (no KV pressure, one step for most prompts), then prefix caching
    off and 16 tokens a step (prompts in many chunks, proposals cut by the budget)."""
    prompts, max_tokens, expected = reference
    options = dict(enable_prefix_caching=False, max_num_batched_tokens=16)
    outputs, stats = greedy(tiny_checkpoint, prompts, max_tokens, draft_spec(tiny_checkpoint, 3))
    assert [o.token_ids for o in outputs] == expected
    outputs, stats = greedy(
        tiny_checkpoint, prompts, max_tokens, draft_spec(tiny_checkpoint, 3), **options
    )
    assert [o.token_ids for o in outputs] == expected
    assert stats.spec_decode.acceptance_rate > 0.97


def test_constrained_greedy_outputs_equal_the_plain_run(tiny_checkpoint, small_draft):
    plain, _ = constrained(tiny_checkpoint)
    for model in (tiny_checkpoint, small_draft):
        outputs, stats = constrained(tiny_checkpoint, draft_spec(model))
        assert [o.token_ids for o in outputs] == [o.token_ids for o in plain]
        assert_same_logprobs(outputs, plain)
        assert stats.spec_decode.num_draft_tokens > 0
    # The grammar cuts the target-as-draft's proposals where it refuses a token; what is
    # sent is the target's own greedy choice under the mask.
    outputs, stats = constrained(tiny_checkpoint, draft_spec(tiny_checkpoint))
    assert stats.spec_decode.acceptance_rate > 0.9


@pytest.mark.slow
def test_tp2_ep2_draft_on_rank_0_equals_one_rank(reference, tiny_checkpoint, ray_cluster):
    prompts, max_tokens, expected = reference
    spec = draft_spec(tiny_checkpoint)
    options = dict(tensor_parallel_size=2, expert_parallel_size=2, **PRESSURE)
    outputs, stats = greedy(tiny_checkpoint, prompts, max_tokens, spec, **options)
    assert [o.token_ids for o in outputs] == expected
    single, _ = greedy(tiny_checkpoint, prompts, max_tokens, spec, **PRESSURE)
    assert_same_logprobs(outputs, single)
    assert stats.spec_decode.acceptance_rate > 0.97
    constrained_two, _ = constrained(
        tiny_checkpoint, spec, tensor_parallel_size=2, expert_parallel_size=2
    )
    constrained_one, _ = constrained(tiny_checkpoint)
    assert [o.token_ids for o in constrained_two] == [o.token_ids for o in constrained_one]


def test_a_draft_with_another_vocabulary_is_refused(tiny_checkpoint, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", overrides={"vocab_size": 640})
    with pytest.raises(ValueError, match=r"vocabulary of 640 tokens, the target 512"):
        LLM(
            model=str(tiny_checkpoint),
            dtype="float32",
            show_progress=False,
            speculative_config=draft_spec(other),
        )


def test_a_draft_of_an_unknown_model_type_is_refused_naming_it(tiny_checkpoint, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", preset="tiny-dense")
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported"):
        LLM(
            model=str(tiny_checkpoint),
            dtype="float32",
            show_progress=False,
            speculative_config=draft_spec(other),
        )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs the draft checkpoint"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "model": "/x"},
            "method 'ngram' proposes without one",
        ),
        (
            {
                "method": "draft_model",
                "model": "/x",
                "num_speculative_tokens": 2,
                "draft_tensor_parallel_size": 2,
            },
            "draft_tensor_parallel_size must be 1",
        ),
    ],
)
def test_draft_settings_are_checked_before_anything_loads(spec, message, tiny_checkpoint):
    with pytest.raises(ValueError, match=message):
        LLM(model=str(tiny_checkpoint), show_progress=False, speculative_config=spec)
