"""The OpenAI Python client against a live server on the tiny checkpoint (no parsers, so chat
content is the raw generated text): response shapes, streaming, usage, n, stop, seeds and
logprobs."""

from __future__ import annotations

import re

import pytest
from http_fixtures import serve_local

MODEL = "tiny"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour, 你好 🙂"},
]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    with serve_local(tiny_checkpoint) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    with served.openai() as client:
        yield client


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def stop_string_from(text: str) -> str:
    """Three characters from inside `text` that occur first after its start."""
    for start in range(4, len(text) - 3):
        candidate = text[start : start + 3]
        if "\ufffd" not in candidate and candidate.strip() and text.find(candidate) > 0:
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


def test_models_list(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    with served.http() as http:
        card = http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == served.engine.engine.max_model_len


def test_chat_message_on_the_wire(served):
    """A plain answer: `content` set, no `tool_calls` key (not an empty list)."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **IGNORE_EOS}
    with served.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str)
    assert "tool_calls" not in message, message


def test_chat_stream_concatenates_to_the_whole_response(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, seed=11, max_tokens=24, temperature=1.0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert whole.object == "chat.completion" and whole.model == MODEL
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    assert not message.tool_calls
    assert getattr(message, "reasoning_content", None) is None

    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    streamed = "".join(c.choices[0].delta.content or "" for c in body)
    assert streamed == message.content
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in body)
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.total_tokens == whole.usage.total_tokens


def test_chat_usage_counts_template_and_generated_tokens(client, served):
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=9,
        seed=3,
        logprobs=True,
        extra_body=IGNORE_EOS,
    )
    usage = response.usage
    assert usage.prompt_tokens == len(chat_prompt_ids(served.tokenizer, MESSAGES))
    assert response.choices[0].finish_reason == "length"
    assert usage.completion_tokens == 9 == len(response.choices[0].logprobs.content)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_n2_gives_two_different_samples(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_tokens=12, seed=5, extra_body=IGNORE_EOS
    )
    assert [c.index for c in response.choices] == [0, 1]
    first, second = (c.message.content for c in response.choices)
    assert first != second
    assert response.usage.completion_tokens == 24


def test_completions_text_and_token_id_prompts_agree(client, served):
    text = "Hello world, 北京"
    ids = served.tokenizer.encode(text)
    kwargs = dict(model=MODEL, max_tokens=8, seed=21, extra_body=IGNORE_EOS)
    by_text = client.completions.create(prompt=text, **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_text.object == "text_completion"
    for response in (by_text, by_ids):
        assert len(response.choices) == 1 and response.choices[0].finish_reason == "length"
        assert response.usage.prompt_tokens == len(ids)
        assert response.usage.completion_tokens == 8
        assert response.usage.total_tokens == len(ids) + 8
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completions_batch_with_n2_orders_choices_by_prompt_then_sample(client, served):
    prompts = ["first prompt", "second"]
    kwargs = dict(model=MODEL, max_tokens=5, seed=8, extra_body=IGNORE_EOS)
    batch = client.completions.create(prompt=prompts, n=2, **kwargs)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == sum(len(served.tokenizer.encode(p)) for p in prompts)
    assert batch.usage.completion_tokens == 4 * 5
    # Sample 0 of a seeded request uses the seed itself: it equals the n=1 answer.
    for i, prompt in enumerate(prompts):
        single = client.completions.create(prompt=prompt, **kwargs)
        assert batch.choices[2 * i].text == single.choices[0].text
    ids_batch = client.completions.create(
        prompt=[served.tokenizer.encode(p) for p in prompts], n=2, **kwargs
    )
    assert [c.text for c in ids_batch.choices] == [c.text for c in batch.choices]


def test_completions_stream_with_usage(client):
    kwargs = dict(model=MODEL, prompt="stream me", max_tokens=10, seed=4, extra_body=IGNORE_EOS)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    *body, last = chunks
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    assert last.choices == []
    assert last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_seed_reproducibility(client):
    def sample(seed: int) -> str:
        response = client.completions.create(
            model=MODEL, prompt="seeded", max_tokens=16, seed=seed, extra_body=IGNORE_EOS
        )
        return response.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_stop_string_cuts_the_text(client, stream):
    kwargs = dict(model=MODEL, messages=MESSAGES, seed=17, max_tokens=40, extra_body=IGNORE_EOS)
    probe = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = stop_string_from(probe)
    expected = probe[: probe.find(stop)]
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stop=[stop], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert finish == ["stop"]
    else:
        choice = client.chat.completions.create(**kwargs, stop=stop).choices[0]
        text = choice.message.content
        assert choice.finish_reason == "stop"
    assert text == expected
    assert stop not in text


def test_chat_logprobs_with_top_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        seed=2,
        logprobs=True,
        top_logprobs=3,
        extra_body=IGNORE_EOS,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 6 == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        if re.fullmatch(r"<0x[0-9A-F]{2}>", entry.token):  # a byte-fallback token
            assert entry.bytes == [int(entry.token[3:5], 16)]
        else:
            assert entry.bytes == list(entry.token.encode())
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3
        assert tops == sorted(tops, reverse=True)
        assert all(lp <= 0.0 for lp in tops)
        assert entry.logprob <= tops[0] + 1e-6


def test_completions_logprobs(client):
    response = client.completions.create(
        model=MODEL, prompt="log me", max_tokens=6, seed=2, logprobs=2, extra_body=IGNORE_EOS
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 6
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    for sampled, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2  # two token ids may decode to the same text
        assert all(lp <= 0.0 for lp in top.values())
        assert sampled <= max(top.values()) + 1e-6
    offsets = logprobs.text_offset
    assert offsets[0] == 0
    pairs = zip(offsets[:-1], offsets[1:], logprobs.tokens[:-1], strict=True)
    assert all(end - start == len(token) for start, end, token in pairs)
