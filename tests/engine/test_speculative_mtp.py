"""`ernie_mtp` speculative decoding end to end on tiny MoE checkpoints that carry `mtp_*`
weights (ernie_cluster_tools/fixtures/make_mtp): greedy tokens equal transformers' and
logprobs equal the plain run's, under chunked prefill, prefix caching and KV pressure
(preemption), at W = 1. Two MTP layers: random weights (proposals nearly always wrong, outputs
still exact) and a layer built to copy its target, whose proposals are mostly the target's own
greedy tokens: high acceptance shows the MTP reads the right hidden rows and next tokens and
its cache mirrors the target's (a shifted or stale row proposes other tokens)."""

from __future__ import annotations

import re

import pytest
import torch
from test_speculative import PRESSURE, assert_same_logprobs, greedy, greedy_reference

from ernie_cluster import LLM
from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.worker.mtp_runner import load_mtp_model
from ernie_cluster_tools.fixtures.make_mtp import (
    make_copying_mtp_checkpoint,
    make_random_mtp_checkpoint,
)


def mtp_spec(k: int, **extra) -> dict:
    return {"method": "ernie_mtp", "num_speculative_tokens": k, **extra}


@pytest.fixture(scope="module")
def random_mtp(tmp_path_factory):
    path = make_random_mtp_checkpoint(tmp_path_factory.mktemp("random_mtp"))
    return path, greedy_reference(path)


@pytest.fixture(scope="module")
def copying_mtp(tmp_path_factory):
    path = make_copying_mtp_checkpoint(tmp_path_factory.mktemp("copying_mtp"))
    return path, greedy_reference(path)


def run_and_check(checkpoint, reference, spec):
    prompts, max_tokens, expected = reference
    outputs, stats = greedy(checkpoint, prompts, max_tokens, spec, **PRESSURE)
    for i, output in enumerate(outputs):
        assert output.token_ids == expected[i], f"prompt {i}"
    plain, _ = greedy(checkpoint, prompts, max_tokens, **PRESSURE)
    assert_same_logprobs(outputs, plain)
    assert stats.num_preemptions > 0
    return stats.spec_decode


def test_random_mtp_weights_keep_greedy_exact(random_mtp):
    checkpoint, reference = random_mtp
    # NOTE: random proposals are nearly always wrong: min_acceptance 0 keeps them coming.
    counters = run_and_check(checkpoint, reference, mtp_spec(2, min_acceptance=0))
    assert counters.num_draft_tokens > 100, counters
    assert counters.acceptance_rate < 0.5, counters


@pytest.mark.parametrize("k", [1, 3])
def test_a_copying_mtp_layer_is_mostly_accepted(copying_mtp, k):
    checkpoint, reference = copying_mtp
    counters = run_and_check(checkpoint, reference, mtp_spec(k))
    # NOTE: under KV pressure proposals get only the budget and blocks decodes left over.
    assert counters.num_draft_tokens > 50, counters
    assert counters.acceptance_rate > 0.9, counters


def test_a_checkpoint_without_mtp_weights_is_refused_naming_it(tiny_checkpoint):
    message = rf"checkpoint {re.escape(str(tiny_checkpoint))} has no mtp_\* weights"
    with pytest.raises(ValueError, match=message):
        LLM(
            model=str(tiny_checkpoint),
            dtype="float32",
            show_progress=False,
            speculative_config=mtp_spec(1),
        )


def test_a_separate_model_is_refused(tiny_checkpoint):
    spec = mtp_spec(1, model="/x")
    with pytest.raises(ValueError, match="reads the target checkpoint's own mtp_"):
        LLM(model=str(tiny_checkpoint), show_progress=False, speculative_config=spec)


@pytest.mark.parametrize("rank", [0, 1])
def test_more_than_one_rank_is_refused_on_every_rank(tiny_checkpoint, rank):
    config = EngineConfig(
        model=str(tiny_checkpoint), tensor_parallel_size=2, speculative_config=mtp_spec(1)
    )
    with pytest.raises(ValueError, match="ernie_mtp runs with tensor_parallel_size 1 only, got 2"):
        load_mtp_model(config, tiny_checkpoint, None, torch.device("cpu"), rank)
