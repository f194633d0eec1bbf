"""Structured outputs through HTTP with the official `openai` client, on the random tiny
checkpoint: response_format, vLLM's structured_outputs / guided_* fields, strict tool calls
(required, named and auto), reasoning first, and 400s for bad specs and unknown fields."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from constraint_schemas import SCHEMAS
from http_fixtures import serve_local

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Give me the data as JSON, please."}]
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {
        "timezone": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}/[A-Z][a-z]{1,10}$"}
    },
    "required": ["timezone"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER, "strict": True},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME, "strict": True}},
]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    # NOTE: no reasoning parser: the random model never closes </think> on its own, so the
    # constraint starts at the first token (the reasoning-first tests have their own server).
    with serve_local(
        tiny_checkpoint, engine_overrides={"max_num_seqs": 64}, tool_call_parser="ernie_x1"
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    with served.openai() as client:
        yield client


def chat_json(client, name: str, seed: int, stream: bool) -> list[str]:
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        n=2,
        seed=seed,
        temperature=1.0,
        max_tokens=800,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
        },
    )
    if not stream:
        response = client.chat.completions.create(**kwargs)
        assert [c.finish_reason for c in response.choices] == ["stop", "stop"]
        return [c.message.content for c in response.choices]
    texts, finishes = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert finishes == ["stop", "stop"]
    return texts


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_every_schema_validates_through_chat(client, stream):
    with ThreadPoolExecutor(8) as pool:
        results = dict(
            zip(
                SCHEMAS,
                pool.map(
                    lambda item: chat_json(client, item[1], item[0], stream), enumerate(SCHEMAS)
                ),
                strict=True,
            )
        )
    for name, texts in results.items():
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_and_completions_fields(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        seed=1,
        max_tokens=400,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(response.choices[0].message.content), dict)
    schema = SCHEMAS["defs_ref"]
    for extra in ({"structured_outputs": {"json": schema}}, {"guided_json": schema}):
        completion = client.completions.create(
            model=MODEL, prompt="JSON:", seed=2, max_tokens=400, extra_body=extra
        )
        jsonschema.validate(json.loads(completion.choices[0].text), schema)
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=MODEL,
            prompt="JSON:",
            seed=3,
            max_tokens=400,
            stream=True,
            extra_body={"guided_json": schema},
        )
        if chunk.choices
    )
    jsonschema.validate(json.loads(streamed), schema)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        (
            {"guided_regex": r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)"},
            lambda t: re.fullmatch(r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)", t),
        ),
        (
            {"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
            lambda t: re.fullmatch(r"\d{3}-\d{4}", t),
        ),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        (
            {
                "guided_grammar": 'root ::= "SELECT " col (", " col){0,2} " FROM t"\ncol ::= [a-z]{1,4}'
            },
            lambda t: re.fullmatch(r"SELECT [a-z]{1,4}(, [a-z]{1,4}){0,2} FROM t", t),
        ),
    ],
    ids=["guided_regex", "so_regex", "guided_choice", "so_choice", "guided_grammar"],
)
def test_regex_choice_and_grammar(client, extra, check):
    completion = client.completions.create(
        model=MODEL,
        prompt="Answer:",
        n=4,
        seed=5,
        temperature=1.0,
        max_tokens=64,
        extra_body=extra,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert check(choice.text), choice.text


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
            "not a valid JSON schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "needs json_schema.schema",
        ),
        ({"guided_regex": "[a-"}, "guided_regex", "Unclosed"),
        ({"guided_grammar": "x ::= 1"}, "guided_grammar", "EBNF"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"structured_outputs": {"json": {"not": {}}}}, "structured_outputs.json", "'not'"),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "exactly one",
        ),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "not several"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
            "not a valid JSON schema",
        ),
        ({"logit_bias": {"99999999": 5}}, "logit_bias", "outside the vocabulary"),
        ({"max_token": 3}, "max_token", "max_token"),
    ],
    ids=[
        "bad-schema",
        "no-schema",
        "regex",
        "ebnf",
        "choice",
        "unsupported",
        "two-kinds",
        "two-fields",
        "tool-schema",
        "bias-id",
        "unknown-field",
    ],
)
def test_bad_specs_are_400_naming_the_field(served, body, param, message):
    with served.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, **body},
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


def finished_calls(choice) -> list:
    """A choice's tool calls, less a last one cut off by max_tokens (finish_reason "length":
    it is reported with its arguments as far as generated, as OpenAI does)."""
    calls = choice.message.tool_calls or []
    return calls[:-1] if choice.finish_reason == "length" else calls


def call_arguments(response) -> list[tuple[str, dict]]:
    calls = []
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            calls.append((call.function.name, json.loads(call.function.arguments)))
    return calls


@pytest.mark.slow  # 50 constrained generations: 10-20 s on a busy 2-core machine
def test_required_and_named_tool_calls_always_validate(client):
    named = {"type": "function", "function": {"name": "get_time"}}

    def ask(seed: int):
        choice = "required" if seed % 2 else named
        response = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            seed=seed,
            temperature=1.0,
            max_tokens=600,
        )
        return choice, call_arguments(response)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(50)))
    for choice, calls in results:
        assert len(calls) == 1
        name, arguments = calls[0]
        if choice is named:
            assert name == "get_time"
        jsonschema.validate(arguments, SCHEMA_OF[name])


@pytest.mark.slow  # four generations of up to 1500 tokens
def test_parallel_required_calls_each_validate(client):
    for seed in range(4):
        response = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            seed=seed,
            temperature=1.0,
            max_tokens=1500,
        )
        calls = [c for choice in response.choices for c in finished_calls(choice)]
        # A random model may chain calls until max_tokens; every call it finished is whole.
        assert calls
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.slow  # six 400-token generations one after another: 10-20 s
def test_auto_tool_calls_validate_when_the_model_opens_one(served, client):
    tool_call = served.tokenizer.token_to_id("<tool_call>")
    responses = [
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            seed=seed,
            temperature=1.0,
            max_tokens=400,
            logit_bias={str(tool_call): 10},
        )
        for seed in range(6)
    ]
    # With the bias the model reopens <tool_call> after each call and may run to max_tokens;
    # every call it returns is whole and valid.
    calls = [
        (call.function.name, json.loads(call.function.arguments))
        for r in responses
        for call in finished_calls(r.choices[0])
    ]
    assert calls
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMA_OF[name])


@pytest.fixture(scope="module")
def reasoning_client(tiny_checkpoint):
    with (
        serve_local(
            tiny_checkpoint, reasoning_parser="ernie_x1", tool_call_parser="ernie_x1"
        ) as served,
        served.openai() as client,
    ):
        yield served, client


def test_reasoning_is_free_and_the_json_follows(reasoning_client):
    served, client = reasoning_client
    think_end = served.tokenizer.token_to_id("</think>")
    schema = SCHEMAS["tool_arguments"]
    for seed in range(4):
        response = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            seed=seed,
            temperature=1.0,
            max_tokens=600,
            logit_bias={str(think_end): 4},
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        message = choice.message.model_dump()
        assert message["reasoning_content"], message  # free text came first
        jsonschema.validate(json.loads(message["content"]), schema)


def test_reasoning_out_of_tokens_returns_no_content(reasoning_client):
    _, client = reasoning_client
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        seed=0,
        temperature=1.0,
        max_tokens=8,
        response_format={"type": "json_object"},
        tools=TOOLS,
        tool_choice="required",
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None and not choice.message.tool_calls
    assert choice.message.model_dump()["reasoning_content"]


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="Unclosed"):
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=3, extra_body={"guided_regex": "[a-"}
        )
