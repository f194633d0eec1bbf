"""/v1/completions scoring a prompt, through the official openai client: `echo` + `logprobs`
(with `max_tokens: 0` and > 0, whole and streamed), vLLM's `prompt_logprobs` field, and
`max_tokens: 0` without echo; values exact against transformers (float32). Its transformers
helpers serve the chat `prompt_logprobs` tests too (test_chat_prompt_logprobs.py)."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy
from http_fixtures import serve_local

from ernie_cluster.serving.logprobs import token_text

TOLERANCE = 1e-5
PROMPT = "The weather in Berlin is"
OTHER = "Hello there, world"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    with serve_local(tiny_checkpoint, engine_overrides=dict(max_num_batched_tokens=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    return served.openai()


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import Ernie4_5_MoeForCausalLM

    return Ernie4_5_MoeForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def log_softmax(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([token_ids])).logits[0].float(), dim=-1)


def check_scored(served, hf, logprobs, token_ids: list[int], top_n: int) -> None:
    """The legacy logprobs object over `token_ids` (prompt first), against transformers."""
    tokenizer = served.tokenizer
    texts = [token_text(tokenizer, t) for t in token_ids]
    assert logprobs.tokens == texts
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert logprobs.text_offset == offsets
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    rows = log_softmax(hf, token_ids)
    for i in range(1, len(token_ids)):
        row = rows[i - 1]
        assert abs(logprobs.token_logprobs[i] - row[token_ids[i]].item()) < TOLERANCE, i
        top = row.topk(top_n)
        expected = {
            token_text(tokenizer, t): v
            for t, v in zip(top.indices.tolist(), top.values, strict=True)
        }
        got = logprobs.top_logprobs[i]
        assert set(got) == set(expected), i
        assert all(abs(got[t] - expected[t].item()) < TOLERANCE for t in got), i


def test_echo_scores_the_prompt_with_max_tokens_0(client, served, hf):
    ids = served.tokenizer.encode(PROMPT)
    out = client.completions.create(
        model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0
    )
    choice = out.choices[0]
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    check_scored(served, hf, choice.logprobs, ids, 1)


def test_echo_with_generated_tokens_covers_prompt_and_completion(client, served, hf):
    ids = served.tokenizer.encode(PROMPT)
    generated = hf_greedy(hf, ids, 4)
    out = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        echo=True,
        logprobs=2,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    completion = served.tokenizer.decode(generated)
    assert choice.text == PROMPT + completion
    assert out.usage.completion_tokens == 4
    check_scored(served, hf, choice.logprobs, ids + generated, 2)


def test_batch_of_prompts_and_token_id_prompts(client, served, hf):
    tokenizer = served.tokenizer
    other_ids = tokenizer.encode(OTHER)
    out = client.completions.create(
        model="tiny", prompt=[PROMPT, OTHER], echo=True, logprobs=0, max_tokens=0
    )
    assert [c.text for c in out.choices] == [PROMPT, OTHER]
    by_ids = client.completions.create(
        model="tiny", prompt=other_ids, echo=True, logprobs=0, max_tokens=0
    )
    assert by_ids.choices[0].text == tokenizer.decode(other_ids, skip_special_tokens=False)
    check_scored(served, hf, by_ids.choices[0].logprobs, other_ids, 0)
    check_scored(served, hf, out.choices[1].logprobs, other_ids, 0)
    check_scored(served, hf, out.choices[0].logprobs, tokenizer.encode(PROMPT), 0)


def test_max_tokens_0_without_echo_returns_nothing(client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, logprobs=1)
    choice = out.choices[0]
    assert (choice.text, choice.finish_reason) == ("", "length")
    assert choice.logprobs.tokens == [] and out.usage.completion_tokens == 0


def check_prompt_logprobs_field(served, hf, field, ids: list[int], top_n: int) -> None:
    """vLLM's `prompt_logprobs` (JSON) over the prompt `ids`, against transformers: None first,
    then each token's top `top_n` (ranked) and the prompt token itself."""
    assert len(field) == len(ids) and field[0] is None
    rows = log_softmax(hf, ids)
    for i in range(1, len(ids)):
        top = rows[i - 1].topk(top_n).indices.tolist()
        entry = {int(t): v for t, v in field[i].items()}
        assert set(entry) == set(top) | {ids[i]}, i
        for rank, token in enumerate(top, start=1):
            assert entry[token]["rank"] == rank
        for token, value in entry.items():
            assert abs(value["logprob"] - rows[i - 1, token].item()) < TOLERANCE, i
            assert value["decoded_token"] == token_text(served.tokenizer, token)


def test_vllm_prompt_logprobs_field(client, served, hf):
    ids = served.tokenizer.encode(PROMPT)
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    assert out.choices[0].logprobs is None
    check_prompt_logprobs_field(served, hf, out.choices[0].prompt_logprobs, ids, 2)


def test_streamed_echo_equals_the_whole_response(client):
    kwargs = dict(
        model="tiny",
        prompt=PROMPT,
        echo=True,
        logprobs=1,
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, values, offsets = "", [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert values == whole.logprobs.token_logprobs
    assert offsets == whole.logprobs.text_offset
