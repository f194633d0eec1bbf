"""Hostile inputs that once stalled or broke the server (issue 14, items 1, 4 and 6): a huge
prompt must not hold up other requests, deep nesting is a 400, and a batch of completion
prompts shares engine steps instead of running one prompt per step."""

from __future__ import annotations

import threading
import time

import pytest
from http_fixtures import openai_error, serve_local, serve_scripted_client

MODEL = "tiny"
SENTENCE = "weather in Paris is nice today and the server answers quickly. "


@pytest.fixture(scope="module")
def long_context(tiny_checkpoint):
    # NOTE: a 128K context admits a 2.5 MB prompt past the size check, so it really tokenizes.
    with serve_scripted_client(
        tiny_checkpoint, {"A": "ok"}, default="A", max_model_len=131072
    ) as served:
        yield served


def test_a_huge_prompt_does_not_hold_up_a_small_one(long_context):
    huge = SENTENCE * 40_000  # 2.5 MB: seconds of tokenizing, then too many tokens
    finished: dict[str, float] = {}

    def send_huge() -> None:
        with long_context.http(timeout=120) as http:
            body = {"model": MODEL, "prompt": huge, "max_tokens": 4}
            finished["huge_status"] = http.post("/v1/completions", json=body).status_code
        finished["huge"] = time.monotonic()

    sender = threading.Thread(target=send_huge)
    sender.start()
    time.sleep(0.5)  # the huge body is uploaded and being tokenized
    with long_context.http() as http:
        small = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        for _ in range(3):
            assert http.post("/v1/completions", json=small).status_code == 200
    finished["small"] = time.monotonic()
    sender.join(timeout=120)
    assert finished["huge_status"] == 400  # 1.6M tokens do not fit in 128K
    assert finished["small"] < finished["huge"]


def test_an_oversized_prompt_is_refused_before_tokenizing(long_context):
    with long_context.http(timeout=60) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 6_000_000}]}
        error = openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert "6000000 characters" in error["message"]


def nested_json(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_schema(depth: int) -> str:
    opening = '{"type": "object", "properties": {"x": '
    return opening * depth + '{"type": "string"}' + "}}" * depth


@pytest.mark.parametrize("depth", [100, 500, 999])
@pytest.mark.parametrize("where", ["tools", "chat_template_kwargs", "tool_call_arguments"])
def test_deep_nesting_is_a_400(long_context, where, depth):
    user = '{"role": "user", "content": "hi"}'
    parts = {
        "tools": f'"tools": [{{"type": "function", "function": {{"name": "f", '
        f'"parameters": {nested_schema(depth)}}}}}]',
        "chat_template_kwargs": f'"chat_template_kwargs": {{"x": {nested_json(depth)}}}',
        "tool_call_arguments": '"tools": []',
    }
    messages = [user]
    if where == "tool_call_arguments":
        messages += [
            '{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", '
            f'"function": {{"name": "f", "arguments": {{"a": {nested_json(depth)}}}}}}}]}}',
            '{"role": "tool", "content": "1", "tool_call_id": "c"}',
            user,
        ]
    body = f'{{"model": "{MODEL}", "max_tokens": 3, "messages": [{", ".join(messages)}], {parts[where]}}}'
    with long_context.http() as http:
        response = http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    openai_error(response, 400)


def test_a_batch_of_prompts_shares_engine_steps(tiny_checkpoint):
    with serve_local(tiny_checkpoint, engine_overrides={"max_num_seqs": 64}) as served:
        engine = served.engine.engine
        step = engine.step
        steps_that_ran = []

        def counting_step(*args, **kwargs):
            outputs = step(*args, **kwargs)
            if outputs:
                steps_that_ran.append(len(outputs))
            return outputs

        engine.step = counting_step
        prompts = [[5 + i, 6, 7, 8] for i in range(40)]
        with served.http() as http:
            body = {"model": MODEL, "prompt": prompts, "max_tokens": 4, "ignore_eos": True}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200
            assert len(response.json()["choices"]) == 40
            too_many = {"model": MODEL, "prompt": [[5]] * 257, "max_tokens": 1}
            error = openai_error(http.post("/v1/completions", json=too_many), 400)
        assert "at most 256 prompts" in error["message"]
    # Submitted together, 40 prompts of 4 tokens and 3 more decodes each take a few steps;
    # one prompt per step (as before) took at least 40.
    assert sum(steps_that_ran) == 40 * 4
    assert len(steps_that_ran) < 20, steps_that_ran
