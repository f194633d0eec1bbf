"""Grammar-constrained generation on the random tiny checkpoint, where the model alone never
writes valid JSON: every output of 22 schemas validates with `jsonschema` (n=2, prefix
caching on, under KV pressure that preempts, and at TP2/EP2), and regex, choice and EBNF
outputs match."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from constraint_schemas import SCHEMAS

from ernie_cluster import LLM, SamplingParams, StructuredOutputsParams

# NOTE: long enough for two full KV blocks, so repeats hit the prefix cache.
PROMPT = "Reply with one JSON value that matches the schema you were given, and nothing else."
MAX_TOKENS = 800


def schema_params(
    seed_base: int = 0, n: int = 2, max_tokens: int = MAX_TOKENS
) -> list[SamplingParams]:
    return [
        SamplingParams(
            n=n,
            temperature=1.0,
            seed=seed_base + i,
            max_tokens=max_tokens,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        for i, schema in enumerate(SCHEMAS.values())
    ]


def assert_all_valid(outputs, n: int = 2) -> None:
    for name, output in zip(SCHEMAS, outputs, strict=True):
        assert len(output.outputs) == n
        for sample in output.outputs:
            assert sample.finish_reason == "stop", (name, sample.finish_reason, sample.text)
            jsonschema.validate(json.loads(sample.text), SCHEMAS[name])


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as llm:
        yield llm


@pytest.mark.slow  # 22 schemas x 2 samples, twice: about 30 s on a busy 2-core machine
def test_every_schema_validates_with_n2_and_prefix_caching(llm):
    prompts = [PROMPT] * len(SCHEMAS)
    assert_all_valid(llm.generate(prompts, schema_params()))
    hits_before = llm.get_stats().prefix_cache_hits
    assert_all_valid(llm.generate(prompts, schema_params(seed_base=100)))
    assert llm.get_stats().prefix_cache_hits > hits_before


def test_unconstrained_random_model_writes_no_json(llm):
    outputs = llm.generate([PROMPT] * 4, SamplingParams(temperature=1.0, seed=3, max_tokens=40))
    for output in outputs:
        with pytest.raises(ValueError):
            json.loads(output.outputs[0].text)


@pytest.mark.slow  # 22 schemas x 2 samples under preemption: about 30 s
def test_every_schema_validates_under_preemption(tiny_checkpoint):
    # 60 blocks of 16 tokens cannot hold 22 requests x 2 samples (4+ blocks each) at once.
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        num_kv_blocks=60,
        max_num_seqs=64,
    ) as llm:
        params = schema_params(seed_base=200, max_tokens=300)
        outputs = llm.generate([PROMPT] * len(SCHEMAS), params)
        assert llm.get_stats().num_preemptions > 0
    assert_all_valid(outputs)


def test_regex_choice_and_grammar_outputs_match(llm):
    ebnf = 'root ::= "(" item ("," item){0,3} ")"\nitem ::= [a-c] [0-9]'
    specs = [
        (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,6} [0-9]{1,3}"), None),
        (StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"]), None),
        (StructuredOutputsParams(grammar=ebnf), None),
    ]
    params = [
        SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=64, structured_outputs=spec)
        for i, (spec, _) in enumerate(specs)
    ]
    regex_out, choice_out, grammar_out = llm.generate([PROMPT] * 3, params)
    for sample in regex_out.outputs:
        assert re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{1,3}", sample.text), sample.text
    for sample in choice_out.outputs:
        assert sample.text in {"alpha", "beta", "gamma delta"}
    for sample in grammar_out.outputs:
        assert re.fullmatch(r"\([a-c][0-9](,[a-c][0-9]){0,3}\)", sample.text), sample.text


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPT], free)[0].outputs[0].token_ids
    mixed = llm.generate([PROMPT, PROMPT], [schema_params(n=1)[0], free])
    jsonschema.validate(json.loads(mixed[0].outputs[0].text), SCHEMAS["nested_object"])
    assert mixed[1].outputs[0].token_ids == alone  # the free row is not masked


def test_a_new_schema_compiles_once(llm):
    manager = llm.engine.structured
    spec = StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}})
    first = llm.engine.processor.process("a", PROMPT, SamplingParams(structured_outputs=spec))
    again = llm.engine.processor.process("b", PROMPT, SamplingParams(structured_outputs=spec))
    assert manager.compiler.submit(first.grammar) is manager.compiler.submit(again.grammar)


def test_bad_combinations_are_value_errors(llm):
    spec = StructuredOutputsParams(json={"type": "object"})
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate([PROMPT], SamplingParams(min_tokens=3, structured_outputs=spec))
    with pytest.raises(ValueError, match=r"structured_outputs\.json is not a valid JSON schema"):
        llm.generate([PROMPT], SamplingParams(structured_outputs={"json": {"type": "nope"}}))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_every_schema_validates_at_tp2_ep2(tiny_checkpoint, ray_cluster):
    with LLM(
        model=str(tiny_checkpoint),
        dtype="float32",
        show_progress=False,
        tensor_parallel_size=2,
        expert_parallel_size=2,
    ) as llm:
        assert_all_valid(llm.generate([PROMPT] * len(SCHEMAS), schema_params(seed_base=300)))


def test_a_slow_compile_never_stalls_other_requests(llm, monkeypatch):
    from ernie_cluster.structured_output.compiler import GrammarCompiler

    release = threading.Event()
    compile_now = GrammarCompiler._compile

    def slow_compile(self, structural_tag):
        release.wait(timeout=30)
        return compile_now(self, structural_tag)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow_compile)
    engine = llm.engine
    spec = StructuredOutputsParams(json={"type": "array", "items": {"type": "boolean"}})
    engine.add_request("slow", PROMPT, SamplingParams(max_tokens=64, structured_outputs=spec))
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    finished: dict[str, object] = {}
    for _ in range(50):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if "free" in finished:
            break
    # The free request ran to its end while the other one's grammar was still compiling.
    assert "free" in finished and "slow" not in finished
    assert engine.scheduler.requests["slow"].num_computed_tokens == 0
    release.set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert json.loads(finished["slow"].outputs[0].text) is not None
