"""skip_special_tokens (default true, as in OpenAI and vLLM) holds in every text field even
though the reasoning and tool parsers see every tag: no `<|im_start|>`, `<s>` or stray
`</tool_call>` in content or reasoning_content (issue 14, item 13)."""

from __future__ import annotations

import pytest
from http_fixtures import serve_scripted_engine

MODEL = "tiny"
LEAKY = (
    "Think <s>about it</think>\n\n<response>\nHello<|im_start|> there</tool_call>!\n</response>\n"
)
TAGS = ("<s>", "<|im_start|>", "</tool_call>", "<response>", "</think>")


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with (
        serve_scripted_engine(
            tiny_checkpoint,
            {"LEAK": LEAKY},
            reasoning_parser="ernie_x1",
            tool_call_parser="ernie_x1",
        ) as served,
        served.openai() as client,
    ):
        yield client


def ask(client, stream: bool, **extra) -> tuple[str, str]:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "LEAK"}], **extra)
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0].message.model_dump()
        return message["content"] or "", message["reasoning_content"] or ""
    content = reasoning = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
    return content, reasoning


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_special_tokens_never_reach_text_fields(client, stream):
    content, reasoning = ask(client, stream)
    assert content == "Hello there!"
    assert reasoning == "Think about it"
    for tag in TAGS:
        assert tag not in content and tag not in reasoning


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_skip_special_tokens_false_keeps_them(client, stream):
    content, reasoning = ask(client, stream, extra_body={"skip_special_tokens": False})
    assert content == "Hello<|im_start|> there</tool_call>!"
    assert reasoning == "Think <s>about it"
