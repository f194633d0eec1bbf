"""Tool calls and reasoning through HTTP with the ernie_x1 parsers, on a model double that
replays a scripted ERNIE output token by token.

Each test runs twice: through the real engine (scheduler, KV cache, detokenizer, stop
handling, async engine) with a ScriptedExecutor in place of the model, and through a
ScriptedClient in place of the whole engine. The user message names the script to replay.
"""

from __future__ import annotations

import json

import pytest
from http_fixtures import serve_scripted_client, serve_scripted_engine

MODEL = "tiny"
WEATHER_ARGS = {"city": "北京"}
REASONING = "I should call the tool."
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
SCRIPTS = {
    "SCRIPT:weather": f"{REASONING}\n</think>\n\n\n{WEATHER_CALL}\n",
    "SCRIPT:plain": "reasoning\n</think>\n\n<response>\nThe answer.\n</response>\n",
    "SCRIPT:broken": (
        "I will call it.\n</think>\n\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": \n</tool_call>\n'
    ),
    # What tool_choice "required" / a named tool constrain the answer after </think> to.
    "SCRIPT:required": f"Must call.\n</think>\n\n\n{WEATHER_CALL}\n",
    "SCRIPT:named": f"Named.\n</think>\n\n\n{WEATHER_CALL}\n",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture(scope="module", params=["engine", "client"])
def served(request, tiny_checkpoint):
    serve = serve_scripted_engine if request.param == "engine" else serve_scripted_client
    with serve(
        tiny_checkpoint, SCRIPTS, reasoning_parser="ernie_x1", tool_call_parser="ernie_x1"
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    with served.openai() as client:
        yield client


def ask(script: str) -> list[dict]:
    return [{"role": "user", "content": f"{script} What is the weather in Beijing?"}]


def script_length(served, script: str) -> int:
    return len(served.tokenizer.encode(SCRIPTS[script]))


def reasoning_of(obj) -> str | None:
    return getattr(obj, "reasoning_content", None)


def collect_stream(chunks) -> dict:
    """Concatenated content and reasoning, tool calls merged by index, finish reasons."""
    content, reasoning, calls, finishes = "", "", {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        reasoning += reasoning_of(delta) or ""
        for call in delta.tool_calls or []:
            merged = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            if call.id:
                assert merged["id"] is None, "a call id is sent once"
                merged["id"] = call.id
                assert call.type == "function"
            if call.function is not None:
                merged["name"] += call.function.name or ""
                merged["arguments"] += call.function.arguments or ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    return {
        "content": content,
        "reasoning": reasoning,
        "calls": [calls[i] for i in sorted(calls)],
        "finishes": finishes,
    }


# ------------------------------------------------------------------------------ tool call
def test_tool_call_whole(client, served):
    response = client.chat.completions.create(
        model=MODEL, messages=ask("SCRIPT:weather"), tools=TOOLS
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert reasoning_of(message) == REASONING
    assert not message.content
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    # The script's tokens and the eos that ended it.
    assert response.usage.completion_tokens == script_length(served, "SCRIPT:weather") + 1


def test_tool_call_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("SCRIPT:weather"), tools=TOOLS, stream=True
    )
    result = collect_stream(stream)
    assert result["finishes"] == ["tool_calls"]
    assert result["reasoning"] == REASONING
    assert result["content"] == ""
    assert len(result["calls"]) == 1
    call = result["calls"][0]
    assert call["id"].startswith("call_") and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == WEATHER_ARGS


@pytest.mark.parametrize(
    ("script", "tool_choice"),
    [
        ("SCRIPT:required", "required"),
        ("SCRIPT:named", {"type": "function", "function": {"name": "get_weather"}}),
    ],
    ids=["required", "named"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_forced_tool_call(client, script, tool_choice, stream):
    kwargs = dict(model=MODEL, messages=ask(script), tools=TOOLS, tool_choice=tool_choice)
    if stream:
        result = collect_stream(client.chat.completions.create(**kwargs, stream=True))
        finish, content, calls = result["finishes"], result["content"], result["calls"]
        assert finish == ["tool_calls"]
        names = [c["name"] for c in calls]
        arguments = [json.loads(c["arguments"]) for c in calls]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        content = choice.message.content
        names = [c.function.name for c in choice.message.tool_calls]
        arguments = [json.loads(c.function.arguments) for c in choice.message.tool_calls]
    assert names == ["get_weather"]
    assert arguments == [WEATHER_ARGS]
    assert not content


# ------------------------------------------------------------------------ plain answers
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_plain_answer_with_reasoning(client, stream):
    kwargs = dict(model=MODEL, messages=ask("SCRIPT:plain"), tools=TOOLS)
    if stream:
        result = collect_stream(client.chat.completions.create(**kwargs, stream=True))
        assert result["finishes"] == ["stop"]
        assert result["calls"] == []
        content, reasoning = result["content"], result["reasoning"]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "stop"
        assert not choice.message.tool_calls
        content, reasoning = choice.message.content, reasoning_of(choice.message)
    assert content == "The answer."
    assert reasoning == "reasoning"


def test_include_reasoning_false_drops_the_reasoning(client):
    choice = client.chat.completions.create(
        model=MODEL, messages=ask("SCRIPT:plain"), extra_body={"include_reasoning": False}
    ).choices[0]
    assert choice.message.content == "The answer."
    assert reasoning_of(choice.message) is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_choice_none_keeps_the_block_in_content(client, stream):
    # NOTE: skip_special_tokens=False keeps the tags verbatim (by default they are dropped
    # from text fields like every added token; tests/serving/test_special_tokens.py).
    kwargs = dict(
        model=MODEL,
        messages=ask("SCRIPT:weather"),
        tools=TOOLS,
        tool_choice="none",
        extra_body={"skip_special_tokens": False},
    )
    if stream:
        result = collect_stream(client.chat.completions.create(**kwargs, stream=True))
        assert result["finishes"] == ["stop"] and result["calls"] == []
        content, reasoning = result["content"], result["reasoning"]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        content, reasoning = choice.message.content, reasoning_of(choice.message)
    assert content == WEATHER_CALL
    assert reasoning == REASONING


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_malformed_tool_json_stays_content(served, stream):
    body = {
        "model": MODEL,
        "messages": ask("SCRIPT:broken"),
        "tools": TOOLS,
        "stream": stream,
        "skip_special_tokens": False,
    }
    with served.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    raw_block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    if stream:
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        assert all("error" not in event for event in events), events
        deltas = [e["choices"][0] for e in events if e["choices"]]
        content = "".join(c["delta"].get("content") or "" for c in deltas)
        reasoning = "".join(c["delta"].get("reasoning_content") or "" for c in deltas)
        assert not any(c["delta"].get("tool_calls") for c in deltas)
        assert [c["finish_reason"] for c in deltas if c.get("finish_reason")] == ["stop"]
    else:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert "tool_calls" not in choice["message"], choice["message"]
        content = choice["message"]["content"]
        reasoning = choice["message"]["reasoning_content"]
    assert content == raw_block
    assert reasoning == "I will call it."


@pytest.mark.parametrize(
    ("script", "tool_choice", "finish", "content"),
    [
        ("SCRIPT:weather", "auto", "tool_calls", None),
        ("SCRIPT:plain", "auto", "stop", "The answer."),
        ("SCRIPT:weather", "none", "stop", WEATHER_CALL),
    ],
    ids=["tool-call", "plain", "tool_choice-none"],
)
def test_message_shape_on_the_wire(served, script, tool_choice, finish, content):
    """`content` is always there (null beside a tool call); `tool_calls` only when there
    are calls, never as an empty list."""
    body = {
        "model": MODEL,
        "messages": ask(script),
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "skip_special_tokens": False,
    }
    with served.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == finish
    assert "content" in message and message["content"] == content, message
    if finish == "tool_calls":
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    else:
        assert "tool_calls" not in message, message
