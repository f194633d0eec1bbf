"""The offline LLM API on the tiny checkpoint: text and token prompts, chat, no tokenizer."""

from __future__ import annotations

import shutil

import pytest

from ernie_cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as instance:
        yield instance


def test_text_and_token_prompts(llm):
    prompt_ids = llm.tokenizer.encode("Hello, ERNIE!")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    by_text, by_ids = llm.generate(["Hello, ERNIE!", prompt_ids], params)
    assert by_text.prompt_token_ids == prompt_ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == llm.tokenizer.decode(by_text.outputs[0].token_ids)
    assert by_text.outputs[0].finish_reason == "length"


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "你好 🙂"}]
    rendered = llm.tokenizer.apply_chat_template(messages)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n")
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered)
    assert len(out.outputs[0].token_ids) == 4


def test_bad_requests_raise_value_errors(llm):
    with pytest.raises(ValueError, match=r"3 prompt tokens and asks for 5000 completion tokens"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 999999]])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(TypeError, match="unknown LLM arguments"):
        LLM(model="x", not_an_option=1)
    assert not llm.engine.has_unfinished_requests()


def test_checkpoint_without_tokenizer(tiny_checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny_checkpoint.iterdir():
        if "safetensors" in path.name or path.name in ("config.json", "generation_config.json"):
            shutil.copy(path, bare / path.name)
    with LLM(model=str(bare), dtype="float32", show_progress=False) as llm:
        assert llm.tokenizer is None
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[0]
        assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate(["text"])
