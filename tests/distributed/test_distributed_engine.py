"""The engine across Ray actors (gloo on CPU): greedy tokens identical and logprobs within
1e-4 of transformers at (T, E) = (1, 1), (2, 2), (4, 4) on 8- and 64-expert checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leaks, random_prompts
from hf_reference import hf_greedy, save_hf_checkpoint

from ernie_cluster import LLM, SamplingParams

pytestmark = pytest.mark.slow

CHECKPOINTS = {
    "experts8": dict(moe_num_experts=8, moe_k=2),
    "experts64": dict(moe_num_experts=64, moe_k=6, moe_intermediate_size=16),
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def reference(request, tmp_path_factory):
    from transformers import Ernie4_5_MoeForCausalLM

    overrides = dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=16, **CHECKPOINTS[request.param]
    )
    path = save_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=11, **overrides)
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = random_prompts(24, hf.config.vocab_size, seed=1, lengths=(1, 300))
    max_tokens = [rng.randint(8, 64) for _ in prompts]
    expected, logprobs = [], []
    for prompt, n in zip(prompts, max_tokens, strict=True):
        tokens = hf_greedy(hf, prompt, n)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
        rows = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + n]
        expected.append(tokens)
        logprobs.append(rows)
    return path, prompts, max_tokens, expected, logprobs


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_transformers(world, reference, ray_cluster):
    path, prompts, max_tokens, expected, logprobs = reference
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in max_tokens
    ]
    with LLM(
        model=str(path),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=world,
        expert_parallel_size=world,
        max_num_batched_tokens=512,
    ) as llm:
        outputs = llm.generate(prompts, params)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            assert sample.token_ids == expected[i], f"prompt {i}"
            for step, entry in enumerate(sample.logprobs):
                for token, value in entry.items():
                    assert abs(value - logprobs[i][step, token].item()) < 1e-4
        assert_no_leaks(llm.engine)
        stats = llm.get_stats()
        load = stats.expert_tokens_per_layer
        moe_k = llm.engine.model_config.moe_k
        # every (token, expert) pair computed was counted once, whatever rank ran it
        assert load.sum(1).tolist() == [stats.num_scheduled_tokens * moe_k] * load.shape[0]
        assert stats.expert_load_imbalance >= 1.0
