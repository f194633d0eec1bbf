"""Speculative decoding end to end on the tiny checkpoint: greedy tokens equal transformers'
and logprobs equal the plain run's, under chunked prefill and KV pressure, with output
constraints, stop strings and stop tokens, at W = 1 and TP2/EP2; sampled tokens keep the
target's exact distribution (a chi-square test against transformers' probabilities)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from engine_helpers import assert_no_leaks, random_prompts
from hf_reference import hf_greedy

from ernie_cluster import LLM, SamplingParams, StructuredOutputsParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}
PRESSURE = dict(enable_prefix_caching=True, max_num_batched_tokens=61, num_kv_blocks=60)


def copy_heavy_prompts(count: int, seed: int) -> list[list[int]]:
    """A random passage repeated: the random model's greedy output soon loops too, so
    proposals from the context are often right (and often wrong)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        passage = [rng.randrange(3, 500) for _ in range(rng.randint(8, 40))]
        prompts.append(passage * 2 + passage[: rng.randint(1, len(passage))])
    return prompts


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return greedy_reference(tiny_checkpoint)


def greedy_reference(checkpoint):
    """Copy-heavy and random prompts, their max_tokens, and transformers' greedy tokens."""
    from transformers import Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = copy_heavy_prompts(8, seed=1) + random_prompts(8, 512, seed=1, lengths=(1, 200))
    max_tokens = [rng.randint(8, 48) for _ in prompts]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    return prompts, max_tokens, expected


def greedy(checkpoint, prompts, max_tokens, spec=None, **options):
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
        for n in max_tokens
    ]
    return run_engine(checkpoint, prompts, params, spec, **options)


def run_engine(checkpoint, prompts, params, spec=None, **options):
    """(first sample of each output, engine stats) of one float32 engine, checked for leaks."""
    extra = {"speculative_config": spec} if spec else {}
    with LLM(
        model=str(checkpoint), dtype="float32", show_progress=False, **options, **extra
    ) as llm:
        outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
        stats = llm.get_stats()
        assert_no_leaks(llm.engine)
    return outputs, stats


def assert_same_logprobs(got, want, tolerance: float = 1e-4) -> None:
    for got_output, want_output in zip(got, want, strict=True):
        for got_step, want_step in zip(got_output.logprobs, want_output.logprobs, strict=True):
            assert got_step.keys() == want_step.keys()
            for token, value in want_step.items():
                assert abs(got_step[token] - value) < tolerance


CASES = {
    "ngram-pressure": (NGRAM, PRESSURE),
    "suffix-pressure": (SUFFIX, PRESSURE),
    "ngram-cache-off-budget-16": (
        NGRAM,
        dict(enable_prefix_caching=False, max_num_batched_tokens=16),
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[] if c == "ngram-pressure" else [pytest.mark.slow]) for c in CASES],
)
def test_greedy_matches_transformers_and_the_plain_run(case, reference, tiny_checkpoint):
    spec, options = CASES[case]
    prompts, max_tokens, expected = reference
    outputs, stats = greedy(tiny_checkpoint, prompts, max_tokens, spec, **options)
    for i, output in enumerate(outputs):
        assert output.token_ids == expected[i], f"prompt {i}"
    plain, _ = greedy(tiny_checkpoint, prompts, max_tokens, **options)
    assert_same_logprobs(outputs, plain)
    spec_stats = stats.spec_decode
    # Proposals were both accepted and rejected: both paths ran.
    assert 0 < spec_stats.num_accepted_tokens < spec_stats.num_draft_tokens
    if "num_kv_blocks" in options:
        assert stats.num_preemptions > 0


def test_stop_strings_stop_tokens_and_max_tokens_hold_mid_acceptance(tiny_checkpoint):
    prompts = [
        "the cat sat on the mat, the cat sat on the mat, the cat sat on",
        "one two three four, one two three four, one two",
    ]
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as plain_llm:
        base = [
            o.outputs[0]
            for o in plain_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40))
        ]
        stops = [out.text[len(out.text) // 2 : len(out.text) // 2 + 3] for out in base]
        stop_ids = [out.token_ids[len(out.token_ids) // 2] for out in base]
        cases = [
            [SamplingParams(temperature=0.0, max_tokens=40, stop=[s]) for s in stops],
            [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[t]) for t in stop_ids],
            [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 11)],
        ]
        want = [[o.outputs[0] for o in plain_llm.generate(prompts, p)] for p in cases]
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        speculative_config=NGRAM,
    ) as llm:
        got = [[o.outputs[0] for o in llm.generate(prompts, p)] for p in cases]
        assert llm.get_stats().spec_decode.num_accepted_tokens > 0
        assert_no_leaks(llm.engine)
    for got_case, want_case in zip(got, want, strict=True):
        for g, w in zip(got_case, want_case, strict=True):
            assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == (
                w.text,
                w.token_ids,
                w.finish_reason,
                w.stop_reason,
            )
    assert any(out.finish_reason == "stop" for out in got[0] + got[1])


def test_unset_max_tokens_runs_to_the_model_length(tiny_checkpoint):
    """max_tokens None (the model's default): every step still samples, with and without
    proposals, until max_model_len."""
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    prompt = [5, 6, 7, 8] * 4
    outputs = []
    for extra in ({}, {"speculative_config": NGRAM}):
        with LLM(
            model=str(tiny_checkpoint),
            dtype="float32",
            show_progress=False,
            max_model_len=48,
            **extra,
        ) as llm:
            outputs.append(llm.generate([prompt], params)[0].outputs[0])
    assert len(outputs[0].token_ids) == 48 - len(prompt)
    assert outputs[1].token_ids == outputs[0].token_ids
    assert outputs[0].finish_reason == outputs[1].finish_reason == "length"


SCHEMAS = {
    "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 12},
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24}, "member": {"type": "boolean"}},
        "required": ["name", "member"],
    },
    "words": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "maxItems": 10},
}


def constrained(checkpoint, spec=None, **options):
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=200,
            logprobs=1,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        for schema in SCHEMAS.values()
    ]
    prompts = ["Reply with JSON. " * 3] * len(SCHEMAS)
    outputs, stats = run_engine(checkpoint, prompts, params, spec, **options)
    for output, schema in zip(outputs, SCHEMAS.values(), strict=True):
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), schema)
    return outputs, stats


def test_constrained_greedy_outputs_equal_the_plain_run(tiny_checkpoint):
    plain, _ = constrained(tiny_checkpoint)
    outputs, stats = constrained(tiny_checkpoint, NGRAM)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain]
    assert_same_logprobs(outputs, plain)
    assert stats.spec_decode.num_accepted_tokens > 0


@pytest.mark.slow
def test_tp2_ep2_speculation_equals_one_rank(reference, tiny_checkpoint, ray_cluster):
    prompts, max_tokens, expected = reference
    options = dict(tensor_parallel_size=2, expert_parallel_size=2, **PRESSURE)
    outputs, stats = greedy(tiny_checkpoint, prompts, max_tokens, NGRAM, **options)
    assert [o.token_ids for o in outputs] == expected
    single, _ = greedy(tiny_checkpoint, prompts, max_tokens, NGRAM, **PRESSURE)
    assert_same_logprobs(outputs, single)
    assert stats.spec_decode.num_accepted_tokens > 0
    constrained_two, _ = constrained(
        tiny_checkpoint, NGRAM, tensor_parallel_size=2, expert_parallel_size=2
    )
    constrained_one, _ = constrained(tiny_checkpoint)
    assert [o.token_ids for o in constrained_two] == [o.token_ids for o in constrained_one]


def test_a_seed_gives_the_same_tokens_with_and_without_speculation(tiny_checkpoint):
    """The sequence's generator is rewound to just after its last kept row, so each position
    draws the noise the plain run draws for it: seeded outputs are equal, not just alike."""
    prompt = [11, 12, 13, 14] * 6 + [11, 12]
    params = [
        SamplingParams(temperature=0.8, top_k=4, max_tokens=12, seed=i, ignore_eos=True)
        for i in range(40)
    ]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    outputs = {}
    for name, extra in (("plain", {}), ("spec", {"speculative_config": spec})):
        with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False, **extra) as llm:
            result = llm.generate([prompt] * len(params), params)
            outputs[name] = [o.outputs[0].token_ids for o in result]
            if name == "spec":
                stats = llm.get_stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert outputs["spec"] == outputs["plain"]


def chi_square_p_value(counts: list[int], probs: list[float]) -> float:
    """Goodness of fit of `counts` to `probs`: P(X >= statistic), X ~ chi2(len - 1)."""
    total = sum(counts)
    statistic = sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.slow  # 600 sampled sequences plus the transformers oracle: ~40 s a method
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampling_keeps_the_targets_distribution(method, tiny_checkpoint):
    """600 seeded samples of 3 tokens at temperature 1, top-k 4. The first token is always
    sampled plainly; the second is where a proposal is verified: the target's most likely
    token after the first (accepted about as often as it would be sampled, rejected
    otherwise), given to the ngram proposer, or the greedy token of the target as its own
    draft model. For each first token, the second token's counts must fit transformers'
    top-4 distribution after it."""
    from transformers import Ernie4_5_MoeForCausalLM

    hf = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    prompt = [11, 12, 13, 14] * 6 + [11, 12]
    top_k = 4

    def top(tokens: list[int]) -> tuple[list[int], list[float]]:
        with torch.no_grad():
            logits = hf(torch.tensor([tokens])).logits[0, -1]
        best = logits.topk(top_k)
        return best.indices.tolist(), best.values.softmax(-1).tolist()

    after = {first: top([*prompt, first]) for first in top(prompt)[0]}
    params = [
        SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, seed=i, ignore_eos=True)
        for i in range(600)
    ]
    spec = {"method": method, "num_speculative_tokens": 1}
    if method == "draft_model":
        spec["model"] = str(tiny_checkpoint)
    with LLM(
        model=str(tiny_checkpoint), dtype="float32", show_progress=False, speculative_config=spec
    ) as llm:
        requests = llm.engine.scheduler.requests

        def propose(req_id: str, num_tokens: int) -> list[int]:
            support, _ = after[requests[req_id].output_token_ids[-1]]
            return support[:1]

        if method == "ngram":
            llm.engine.proposer._method.propose = propose
        outputs = [o.outputs[0].token_ids for o in llm.generate([prompt] * len(params), params)]
        stats = llm.get_stats().spec_decode
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    by_first: dict[int, list[int]] = {}
    for tokens in outputs:
        by_first.setdefault(tokens[0], []).append(tokens[1])
    tested = 0
    for first, seconds in by_first.items():
        support, probs = after[first]
        assert set(seconds) <= set(support)
        if len(seconds) < 60:
            continue
        counts = [seconds.count(t) for t in support]
        assert chi_square_p_value(counts, probs) > 1e-3, (first, counts, probs)
        tested += 1
    assert tested >= 2
