"""A 32K-token prompt goes through chunked prefill, matches transformers, and does not
stall a short request submitted with it."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_no_leaks
from hf_reference import hf_greedy

from ernie_cluster import LLM, SamplingParams

LONG = 32 * 1024


@pytest.mark.slow
def test_32k_prompt_chunked_prefill(tiny_checkpoint):
    from transformers import Ernie4_5_MoeForCausalLM

    rng = random.Random(0)
    long_prompt = [rng.randrange(13, 512) for _ in range(LONG)]
    short_prompt = [rng.randrange(13, 512) for _ in range(20)]
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    expected = hf_greedy(hf, long_prompt, 8)
    del hf

    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        max_model_len=LONG + 64,
        max_num_batched_tokens=2048,
    ) as llm:
        engine = llm.engine
        engine.add_request("long", long_prompt, greedy)
        engine.add_request("short", short_prompt, greedy)
        step, short_done_at, long_first_token_at, long_out = 0, None, None, None
        while engine.has_unfinished_requests():
            step += 1
            for out in engine.step():
                if out.request_id == "short" and out.finished:
                    short_done_at = step
                if out.request_id == "long":
                    long_first_token_at = long_first_token_at or step
                    long_out = out
        assert long_out.outputs[0].token_ids == expected
        assert long_first_token_at >= LONG // 2048  # one chunk per step
        assert short_done_at < long_first_token_at
        assert_no_leaks(engine)
