"""vLLM's `prompt_logprobs` on /v1/chat/completions, through the official openai client: the
top-level field over the rendered chat prompt (whole, n = 2, streamed on the first chunk), its
bounds, and its absence when not asked; values exact against transformers (float32) on the
same prompt ids, with the completions test's helpers."""

from __future__ import annotations

import openai
import pytest
from http_fixtures import serve_local
from test_prompt_logprobs_http import check_prompt_logprobs_field, hf  # noqa: F401 (fixture)

MODEL = "tiny"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour, 你好 🙂"},
]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    # NOTE: 8-token steps: the chat prompt's logprobs come from several prefill chunks.
    with serve_local(tiny_checkpoint, engine_overrides=dict(max_num_batched_tokens=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    with served.openai() as client:
        yield client


def rendered_ids(served) -> list[int]:
    """The chat prompt's token ids, rendered and encoded as the existing chat usage test does."""
    tokenizer = served.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))


@pytest.mark.parametrize("top_n", [0, 2])
def test_whole_response_carries_the_field_at_the_top_level(client, served, hf, top_n):  # noqa: F811
    out = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=2,
        extra_body={"prompt_logprobs": top_n, "ignore_eos": True},
    )
    ids = rendered_ids(served)
    assert out.usage.prompt_tokens == len(ids) == len(out.prompt_logprobs)
    assert out.prompt_logprobs[0] is None
    assert out.choices[0].logprobs is None
    check_prompt_logprobs_field(served, hf, out.prompt_logprobs, ids, top_n)


def test_n2_gives_one_field_for_the_shared_prompt(client, served, hf):  # noqa: F811
    out = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        n=2,
        max_tokens=3,
        seed=5,
        extra_body={"prompt_logprobs": 1, "ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert len(out.prompt_logprobs) == out.usage.prompt_tokens
    check_prompt_logprobs_field(served, hf, out.prompt_logprobs, rendered_ids(served), 1)


def test_streamed_field_is_on_the_first_chunk_only(client, served, hf):  # noqa: F811
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"prompt_logprobs": 2, "ignore_eos": True},
        )
    )
    first, rest = chunks[0], chunks[1:]
    assert first.choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == len(first.prompt_logprobs)
    assert all(getattr(c, "prompt_logprobs", None) is None for c in rest)
    check_prompt_logprobs_field(served, hf, first.prompt_logprobs, rendered_ids(served), 2)


def test_absent_unless_asked(served):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    with served.http() as http:
        whole = http.post("/v1/chat/completions", json=body)
        stream = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert whole.status_code == 200 == stream.status_code, whole.text
    assert "prompt_logprobs" not in whole.json()
    assert "prompt_logprobs" not in stream.text


@pytest.mark.parametrize("value", [21, -1])
def test_out_of_range_is_a_400_naming_the_field(client, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_body={"prompt_logprobs": value}
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "prompt_logprobs"
