"""Prompt logprobs (`SamplingParams.prompt_logprobs`) exact against transformers' teacher-forced
log_softmax of the prompt, float32: at W = 1 with chunked prefill and a cached prefix present,
with max_tokens = 0 (nothing sampled) and > 0, n > 1; and at TP2/EP2 over Ray (slow)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_no_leaks
from hf_reference import hf_greedy

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.worker.prompt_logprobs import plan_rows

TOLERANCE = 1e-5
TOP_K = 3


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def prompts(vocab: int) -> list[list[int]]:
    shared = [(11 * j + 5) % (vocab - 3) + 3 for j in range(40)]
    return [
        [*shared, 7, 9, 11, 13, 15],  # its first 40 tokens are cached before it runs
        [(13 * j + 1) % (vocab - 3) + 3 for j in range(53)],  # several prefill chunks
        [42],  # one token: nothing precedes it
        [(3 * j + 2) % (vocab - 3) + 3 for j in range(9)],
    ]


def reference(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), V] log_softmax of the logits at each position (row j predicts j + 1)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def check_prompt_logprobs(hf, prompt: list[int], got, k: int) -> None:
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    expected = reference(hf, prompt)
    for i in range(1, len(prompt)):
        entry, row = got[i], expected[i - 1]
        assert prompt[i] in entry, f"position {i}: the prompt token is missing"
        top = row.topk(k).indices.tolist() if k else []
        assert set(entry) == set(top) | {prompt[i]}, f"position {i}"
        for token, value in entry.items():
            assert abs(value - row[token].item()) < TOLERANCE, (i, token, value)


def run_checks(llm: LLM, hf) -> None:
    vocab = hf.config.vocab_size
    scored, chunked, single, short = prompts(vocab)
    # a plain request first: the shared prefix of `scored` is in the prefix cache from here on
    llm.generate([[*scored[:40], 99, 98]], SamplingParams(temperature=0, max_tokens=2))
    outputs = llm.generate(
        [scored, chunked, single, short, short],
        [
            SamplingParams(prompt_logprobs=TOP_K, max_tokens=0),
            SamplingParams(prompt_logprobs=0, max_tokens=5, temperature=0, ignore_eos=True),
            SamplingParams(prompt_logprobs=2, max_tokens=0),
            SamplingParams(prompt_logprobs=1, n=2, max_tokens=3, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        ],
    )
    zero, generated, one, siblings, plain = outputs
    check_prompt_logprobs(hf, scored, zero.prompt_logprobs, TOP_K)
    assert zero.num_cached_tokens == 0  # recomputed although its prefix was cached
    assert [(s.token_ids, s.text, s.finish_reason) for s in zero.outputs] == [([], "", "length")]
    check_prompt_logprobs(hf, chunked, generated.prompt_logprobs, 0)
    assert generated.outputs[0].token_ids == hf_greedy(hf, chunked, 5)
    assert one.prompt_logprobs == [None] and one.outputs[0].token_ids == []
    check_prompt_logprobs(hf, short, siblings.prompt_logprobs, 1)
    expected = hf_greedy(hf, short, 3)
    assert [s.token_ids for s in siblings.outputs] == [expected, expected]
    assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == expected
    assert_no_leaks(llm.engine)


def run_on(checkpoint, hf, world: int) -> None:
    with LLM(
        model=str(checkpoint),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=world,
        expert_parallel_size=world,
        block_size=4,
        max_num_batched_tokens=16,  # every longer prompt runs in chunks
    ) as llm:
        run_checks(llm, hf)


def test_prompt_logprobs_match_transformers(tiny_checkpoint, hf):
    run_on(tiny_checkpoint, hf, world=1)


@pytest.mark.slow
def test_prompt_logprobs_at_tp2_ep2(tiny_checkpoint, hf, ray_cluster):
    run_on(tiny_checkpoint, hf, world=2)


def test_rows_are_reported_once_across_chunks_and_recomputes():
    # a 10-token prompt: positions 0..8 predict tokens 1..9
    assert plan_rows(0, 4, 10, 0) == (0, 4)
    assert plan_rows(4, 10, 10, 4) == (4, 9)
    # a recompute after preemption (from 0) reports only what was not reported yet
    assert plan_rows(0, 6, 10, 4) == (4, 6)
    assert plan_rows(0, 3, 10, 4) == (4, 4)
    # decodes after the prompt report nothing
    assert plan_rows(10, 11, 10, 9) == (10, 10)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20]"),
        (dict(prompt_logprobs=-1), "prompt_logprobs must be in [0, 20]"),
        (dict(max_tokens=-1), "max_tokens must be >= 0"),
    ],
)
def test_bad_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**fields)
