"""OpenAI request fields that real clients send (issue 22, item 4), with the official openai
client: accepted where they change nothing for this model, refused with a worded 400 where they
ask for what it cannot do, and the legacy functions / function_call answered as OpenAI does."""

from __future__ import annotations

import json

import openai
import pytest
from http_fixtures import serve_scripted_engine

MODEL = "tiny"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
SCRIPTS = {
    "SCRIPT:weather": f"I should call the tool.\n</think>\n\n\n{CALL}\n",
    "SCRIPT:plain": "reasoning\n</think>\n\n<response>\nThe answer.\n</response>\n",
    "SCRIPT:paragraphs": (
        "First thought.\n\nSecond thought.\n</think>\n\n<response>\nOne.\n\nTwo.\n</response>\n"
    ),
}
WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with serve_scripted_engine(
        tiny_checkpoint, SCRIPTS, reasoning_parser="ernie_x1", tool_call_parser="ernie_x1"
    ) as served:
        yield served.openai()


def ask(client, script: str, **fields):
    messages = [{"role": "user", "content": script}]
    return client.chat.completions.create(model=MODEL, messages=messages, **fields)


def test_reasoning_effort_and_verbosity_are_accepted_and_change_nothing(client):
    plain = ask(client, "SCRIPT:plain", max_tokens=40)
    tuned = ask(client, "SCRIPT:plain", max_tokens=40, reasoning_effort="high", verbosity="low")
    assert tuned.choices[0].message.content == plain.choices[0].message.content == "The answer."
    text_only = ask(client, "SCRIPT:plain", max_tokens=40, modalities=["text"], audio=None)
    assert text_only.choices[0].message.content == "The answer."


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "enormous"}, "reasoning_effort"),
    ],
)
def test_what_this_model_cannot_do_is_a_worded_400(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "SCRIPT:plain", max_tokens=4, **fields)
    error = caught.value.body
    assert error["param"] == param, error


def test_legacy_functions_are_answered_with_function_call(client):
    whole = ask(
        client, "SCRIPT:weather", functions=[WEATHER], function_call={"name": "get_weather"}
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "北京"}
    stream = ask(client, "SCRIPT:weather", functions=[WEATHER], stream=True)
    calls = [c.choices[0].delta.function_call for c in stream if c.choices]
    calls = [call for call in calls if call is not None]
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "北京"}


def test_tools_and_functions_together_are_refused(client):
    tools = [{"type": "function", "function": WEATHER}]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "SCRIPT:weather", functions=[WEATHER], tools=tools)
    assert "not both" in caught.value.body["message"]


# ------------------------------------------------------------- routes and shapes (item 5)
def test_models_retrieve_and_a_stable_created(client):
    listed = client.models.list().data
    again = client.models.list().data
    one = client.models.retrieve(MODEL)
    assert one.id == MODEL and one.created == listed[0].created == again[0].created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_system_fingerprint_reasoning_tokens_and_null_finish_reasons(client, tiny_checkpoint):
    from ernie_cluster.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    script = tokenizer.encode(SCRIPTS["SCRIPT:plain"])
    reasoning = script.index(tokenizer.token_to_id("</think>")) + 1
    whole = ask(client, "SCRIPT:plain", max_tokens=60)
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("fp_")
    assert whole.usage.completion_tokens_details.reasoning_tokens == reasoning
    assert whole.usage.completion_tokens > reasoning
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "SCRIPT:plain"}],
        max_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = [
        json.loads(line[len("data: ") :])
        for line in raw.http_response.iter_lines()
        if line.startswith("data: {")
    ]
    with_choices = [e for e in events if e["choices"]]
    assert all("finish_reason" in e["choices"][0] for e in with_choices)
    assert [e["choices"][0]["finish_reason"] for e in with_choices][:-1] == [None] * (
        len(with_choices) - 1
    )
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert {e["system_fingerprint"] for e in events} == {whole.system_fingerprint}
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning


def test_tokenize_detokenize_and_tokenizer_info(client, tiny_checkpoint):
    import httpx

    from ernie_cluster.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    base = str(client.base_url).removesuffix("/v1/")
    with httpx.Client(base_url=base, timeout=30) as http:
        text = "Hello there, 你好"
        out = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert out["tokens"] == tokenizer.encode(text) and out["count"] == len(out["tokens"])
        assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
        assert out["max_model_len"] == 4096
        messages = [{"role": "user", "content": text}]
        chat = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert chat["tokens"] == tokenizer.encode(rendered)
        back = http.post("/detokenize", json={"tokens": out["tokens"]}).json()
        assert back == {"prompt": text}
        bad = http.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        info = http.get("/tokenizer_info").json()
        assert info["chat_template"] == tokenizer.chat_template
        assert info["vocab_size"] == tokenizer.vocab_size
        assert http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
        assert http.post("/tokenize", json={}).status_code == 400


def test_tokenizer_routes_need_the_api_key(tiny_checkpoint):
    import httpx

    with (
        serve_scripted_engine(tiny_checkpoint, SCRIPTS, api_key="sekret") as served,
        httpx.Client(base_url=served.base_url, timeout=30) as http,
    ):
        assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert http.get("/tokenizer_info").status_code == 401
        keyed = {"Authorization": "Bearer sekret"}
        assert http.post("/tokenize", json={"prompt": "x"}, headers=keyed).status_code == 200


# ------------------------------------------------------------ stop strings (item 3)
def test_stop_strings_apply_to_the_answer_not_the_reasoning(client):
    """lm-eval's default `until` is ["\n\n"]: it must cut the answer, not the reasoning nor
    the layout between `</think>` and `<response>`."""
    out = ask(client, "SCRIPT:paragraphs", max_tokens=80, stop=["\n\n"])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "One."
    assert choice.message.reasoning_content == "First thought.\n\nSecond thought."
    streamed = ask(client, "SCRIPT:paragraphs", max_tokens=80, stop=["\n\n"], stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "One."
    assert chunks[-1].finish_reason == "stop"
    # A stop string that only the reasoning holds never fires.
    whole = ask(client, "SCRIPT:paragraphs", max_tokens=80, stop=["thought"])
    assert whole.choices[0].message.content == "One.\n\nTwo."


def test_without_a_reasoning_parser_stop_strings_cut_the_whole_text(tiny_checkpoint):
    with serve_scripted_engine(tiny_checkpoint, SCRIPTS) as served:
        out = ask(served.openai(), "SCRIPT:paragraphs", max_tokens=80, stop=["\n\n"])
    assert out.choices[0].message.content == "First thought."


def test_a_request_without_model_gets_the_first_served_model(client):
    # Model cards' curl examples (ERNIE-4.5's function-calling one among them) send no model;
    # vLLM then serves its first served model name, and so do we.
    body = {"messages": [{"role": "user", "content": "SCRIPT:plain"}], "max_tokens": 40}
    reply = client.post("/chat/completions", cast_to=dict, body=body)
    assert reply["model"] == MODEL
    assert reply["choices"][0]["message"]["content"] == "The answer."
    with pytest.raises(openai.NotFoundError):
        client.post("/chat/completions", cast_to=dict, body={**body, "model": "other"})
    body = {"prompt": "SCRIPT:plain", "max_tokens": 3}
    assert client.post("/completions", cast_to=dict, body=body)["model"] == MODEL
