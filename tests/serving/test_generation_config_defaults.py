"""The checkpoint's generation_config.json (temperature / top_p / top_k) fills what a request
leaves out, the same way for `LLM.generate` / `LLM.chat` and for the HTTP server (the official
openai client): the same request and seed give the same tokens through both."""

from __future__ import annotations

import json

import pytest
from http_fixtures import serve_local

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.serving.logprobs import token_text
from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

GENERATION = {"temperature": 0.6, "top_p": 0.7, "top_k": 4}
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
SEED, MAX_TOKENS = 1234, 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gencfg"), preset="tiny", seed=0)
    config_file = path / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **GENERATION}))
    return path


@pytest.fixture(scope="module")
def offline(checkpoint):
    with LLM(model=str(checkpoint), dtype="float32", show_progress=False) as llm:
        left_out = SamplingParams(seed=SEED, max_tokens=MAX_TOKENS, ignore_eos=True)
        neutral = SamplingParams(
            seed=SEED, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=1.0, top_p=1.0, top_k=0
        )
        yield {
            "completion": llm.generate([PROMPT], left_out)[0].outputs[0],
            "completion_neutral": llm.generate([PROMPT], neutral)[0].outputs[0],
            "chat": llm.chat(MESSAGES, left_out)[0].outputs[0],
        }


def test_the_model_defaults_change_the_sample(offline):
    """Guards the test below: with these settings the checkpoint's defaults matter."""
    assert offline["completion"].token_ids != offline["completion_neutral"].token_ids


def test_offline_and_http_sample_the_same_tokens(checkpoint, offline):
    with serve_local(checkpoint) as served, served.openai() as client:
        completion = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            seed=SEED,
            logprobs=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        chat = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            seed=SEED,
            logprobs=True,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )

    # NOTE: logprobs name each sampled token as clients see it (serving.logprobs.token_text).
    def shown(token_ids: list[int]) -> list[str]:
        return [token_text(served.tokenizer, token_id) for token_id in token_ids]

    assert completion.choices[0].logprobs.tokens == shown(offline["completion"].token_ids)
    assert completion.choices[0].text == offline["completion"].text
    http_chat = [entry.token for entry in chat.choices[0].logprobs.content]
    assert http_chat == shown(offline["chat"].token_ids)
