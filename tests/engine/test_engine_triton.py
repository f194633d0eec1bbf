"""The engine with the Triton attention backend gives exactly transformers' greedy tokens:
chunked prefill (chunks after a cached prefix), prefix-cache hits and mixed prefill + decode
steps. Without a GPU the kernels run in Triton's CPU interpreter, so the prompt set is a
reduced one of test_engine_equivalence's."""

from __future__ import annotations

import os
import random

import torch

# NOTE: before any Triton kernel module is imported (see tests/attention/test_triton_attention).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from engine_helpers import assert_no_leaks, random_prompts
from hf_reference import hf_greedy

from ernie_cluster import LLM, SamplingParams

pytest.importorskip("triton")


@pytest.mark.slow  # the interpreter: about 50 s on a 2-core machine
@pytest.mark.parametrize(
    "options",
    [
        dict(enable_prefix_caching=True, max_num_batched_tokens=61),
        dict(enable_prefix_caching=False, max_num_batched_tokens=2048, block_size=64),
    ],
    ids=["cache-on-budget-61", "cache-off-budget-2048-block-64"],
)
def test_triton_backend_matches_transformers(options, tiny_checkpoint):
    from transformers import Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = random_prompts(6, 512, seed=1, lengths=(1, 150), shared_prefix=40)
    max_tokens = [rng.randint(4, 12) for _ in prompts]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        device=device,
        attention_backend="triton",
        show_progress=False,
        **options,
    ) as llm:
        backend = llm.engine.executor.worker.model.layers[0].self_attn.backend
        assert type(backend).__name__ == "TritonPagedAttention"
        # The second round finds the first round's prompts cached (with caching on): its
        # prefills are chunks after a cached prefix.
        for _ in range(2):
            outputs = llm.generate(prompts, params)
            for i, out in enumerate(outputs):
                got = out.outputs[0].token_ids
                assert got == expected[i], f"prompt {i} ({len(prompts[i])} tok)"
        if options["enable_prefix_caching"]:
            assert llm.get_stats().prefix_cache_hits > 0
        assert_no_leaks(llm.engine)
