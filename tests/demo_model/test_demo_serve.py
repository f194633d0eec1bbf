"""The demo model behind the Ray Serve application at TP2/EP2 with the ernie_x1 parsers, asked
held-out questions through the official openai client (127.0.0.1, a port picked at run time).

The questions come from the held-out split of the conversation generator (cities and
phrasings no training conversation uses); answers are checked with json.loads and plain
string tests."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from ernie_cluster.checkpoints.demo import DEMO_SERVED_NAME as SERVED_NAME
from ernie_cluster.checkpoints.demo import demo_checkpoint as shipped_checkpoint
from ernie_cluster.distributed.process_group import free_port
from ernie_cluster_tools.demo_model.conversations import generate_examples, weather_tool

pytestmark = pytest.mark.slow

APP = "ernie-demo-test"
SEED = 2024
LEAKS = (
    "<|im_start|>",
    "<|im_end|>",
    "</s>",
    "<s>",
    "<think>",
    "</think>",
    "<response>",
    "</response>",
    "<tool_call>",
    "\ufffd",
)


@pytest.fixture(scope="module")
def client(ray_cluster):
    from openai import OpenAI
    from ray import serve

    from ernie_cluster.serving.ray_serve.builder import build_app
    from ernie_cluster.serving.ray_serve.config import ServeAppConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeAppConfig(
        model=str(shipped_checkpoint()),
        served_model_name=[SERVED_NAME],
        dtype="float32",
        tensor_parallel_size=2,
        expert_parallel_size=2,
        reasoning_parser="ernie_x1",
        tool_call_parser="ernie_x1",
    )
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    try:
        yield OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0
        )
    finally:
        serve.delete(APP)
        serve.shutdown()


def ask_all(client, conversations, **kwargs):
    """Greedy replies to (messages, tools) pairs, eight requests in flight."""

    def ask(conversation):
        messages, tools = conversation
        return client.chat.completions.create(
            model=SERVED_NAME,
            messages=messages,
            tools=tools,
            temperature=0.0,
            max_tokens=200,
            **kwargs,
        ).choices[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(ask, conversations))


def heldout(family: str, num_examples: int, seed: int = SEED) -> list:
    return generate_examples(num_examples, seed=seed, split="heldout", families=(family,))


def inputs(examples) -> list:
    return [(e.messages, e.tools) for e in examples]


def test_heldout_weather_questions_get_a_get_weather_call(client):
    examples = heldout("weather_call", 30)
    choices = ask_all(client, inputs(examples))
    correct = 0
    misses = []
    for example, choice in zip(examples, choices, strict=True):
        expected = example.facts["arguments"]
        calls = choice.message.tool_calls or []
        for call in calls:
            arguments = json.loads(call.function.arguments)  # every call is JSON
            assert isinstance(arguments, dict)
        assert "<tool_call>" not in (choice.message.content or "")
        first = calls[0] if calls else None
        if (
            first is not None
            and first.function.name == "get_weather"
            and json.loads(first.function.arguments).get("location") == expected["location"]
        ):
            correct += 1
            assert choice.finish_reason == "tool_calls"
        else:
            misses.append((expected, choice.message))
    assert correct >= 27, misses


def test_units_asked_for_are_passed_on(client):
    examples = [
        e for e in heldout("weather_call", 60, seed=SEED + 1) if "unit" in e.facts["arguments"]
    ][:8]
    choices = ask_all(client, inputs(examples))
    right = sum(
        bool(c.message.tool_calls)
        and json.loads(c.message.tool_calls[0].function.arguments) == e.facts["arguments"]
        for e, c in zip(examples, choices, strict=True)
    )
    assert right >= len(examples) - 1


def test_answers_after_a_tool_result_state_its_temperature(client):
    examples = heldout("weather_answer", 20)
    choices = ask_all(client, inputs(examples))
    stated = [
        str(e.facts["result"]["temperature"]) in (c.message.content or "")
        for e, c in zip(examples, choices, strict=True)
    ]
    assert sum(stated) >= 18, [c.message.content for c in choices]
    assert all(c.finish_reason == "stop" and not c.message.tool_calls for c in choices)


def test_greetings_get_clean_content(client):
    readme = [([{"role": "user", "content": text}], None) for text in ("Hello!", "你好")]
    for choice in ask_all(client, inputs(heldout("greeting", 6)) + readme):
        content = choice.message.content
        assert content and content.strip(), choice.message
        assert not any(leak in content for leak in LEAKS), content
        assert getattr(choice.message, "reasoning_content", None)


def test_requests_it_was_not_trained_for_get_an_honest_answer(client):
    # NOTE: without tools only: with a weather tool in the request, the 1.8M model may take
    # an unfamiliar request for a weather question ("Can you recommend a movie?" -> a call
    # for "Can"), a known limit of the demo model (RESULTS.md).
    unrelated = [e for e in heldout("out_of_scope", 24) if not e.tools][:6]
    examples = unrelated + heldout("weather_no_tools", 6)
    for example, choice in zip(examples, ask_all(client, inputs(examples)), strict=True):
        content = choice.message.content
        assert content and not any(leak in content for leak in LEAKS), content
        assert not choice.message.tool_calls and choice.finish_reason == "stop"
        if example.family == "weather_no_tools":
            assert example.facts["city"] in content, content
            assert "can't" in content or "not able" in content, content


def test_readme_weather_example_streams_a_tool_call(client):
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[weather_tool()],
        temperature=0.0,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for call in chunk.choices[0].delta.tool_calls or []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(arguments) == {"location": "Paris"}
    assert finish == "tool_calls"
