"""The engine gives exactly transformers' greedy tokens whatever the scheduling does:
prefix caching on or off, tiny or large step budgets (chunked prefill), and preemption."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leaks, random_prompts
from hf_reference import hf_greedy

from ernie_cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = random_prompts(24, 512, seed=0, lengths=(1, 300))
    max_tokens = [rng.randint(8, 64) for _ in prompts]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    return prompts, max_tokens, expected


CASES = {
    "cache-on-budget-2048": dict(enable_prefix_caching=True, max_num_batched_tokens=2048),
    "cache-off-budget-2048": dict(enable_prefix_caching=False, max_num_batched_tokens=2048),
    "cache-on-budget-61": dict(enable_prefix_caching=True, max_num_batched_tokens=61),
    "cache-off-budget-61": dict(enable_prefix_caching=False, max_num_batched_tokens=61),
    "cache-on-budget-16": dict(enable_prefix_caching=True, max_num_batched_tokens=16),
    "cache-off-budget-16": dict(enable_prefix_caching=False, max_num_batched_tokens=16),
    "preempt-cache-on": dict(enable_prefix_caching=True, num_kv_blocks=48),
    "preempt-cache-off": dict(
        enable_prefix_caching=False, num_kv_blocks=48, max_num_batched_tokens=61
    ),
}


@pytest.mark.slow  # 8 engines x 24 prompts + the transformers reference: 25 s idle, minutes on a busy 2-core machine
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(case, reference, tiny_checkpoint):
    prompts, max_tokens, expected = reference
    options = CASES[case]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False, **options) as llm:
        outputs = llm.generate(prompts, params)
        stats = llm.get_stats()
        for i, out in enumerate(outputs):
            assert out.outputs[0].token_ids == expected[i], f"prompt {i} ({len(prompts[i])} tok)"
        if "num_kv_blocks" in options:
            assert stats.num_preemptions > 0
        if options.get("enable_prefix_caching"):
            assert stats.prefix_cache_hits > 0
        assert_no_leaks(llm.engine)
