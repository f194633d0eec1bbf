"""The Tokenizer wrapper: loading, special tokens, byte fallback, and parity with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ernie_cluster.tokenizer import Tokenizer, load_tokenizer
from ernie_cluster_tools.fixtures.tiny_tokenizer import (
    BYTE_TOKENS,
    CONTROL_TOKENS,
    build_tiny_tokenizer,
)

SAMPLES = [
    "Hello world",
    "  two leading spaces and a trailing one ",
    "你好🙂",
    "Line one\nLine two\n\n\tTabbed",
    "def get_user(name):\n    return name.upper()",
    "<|im_start|>user\nWeather in 北京?<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "<think>reason</think>\n\n<response>\nanswer\n</response><tool_call>{}</tool_call>",
    "literal <0x41> is text, not a byte",
]
FIXED_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|im_start|>": 3,
    "<|im_end|>": 4,
    "<think>": 5,
    "</think>": 6,
    "<response>": 7,
    "</response>": 8,
    "<tool_call>": 9,
    "</tool_call>": 10,
    "<|begin_of_sentence|>": 11,
    "<|end_of_sentence|>": 12,
}


@pytest.fixture(params=["tiny", "mini"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_special_token_ids_are_fixed(tokenizer: Tokenizer) -> None:
    assert {content: tokenizer.token_to_id(content) for content in FIXED_IDS} == FIXED_IDS
    assert [content for content, _ in CONTROL_TOKENS] == list(FIXED_IDS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.all_special_ids == frozenset({0, 1, 2, 3, 4, 11, 12})
    assert tokenizer.stop_token_ids_default() == [2, 4]
    for content, token_id in FIXED_IDS.items():
        assert tokenizer.encode(content) == [token_id]


def test_special_tokens_skipped_but_tags_kept(tokenizer: Tokenizer) -> None:
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<response>\nok\n</response>\n<|im_end|></s>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert (
        tokenizer.decode(ids) == "assistant\n<think>\nhm\n</think>\n\n<response>\nok\n</response>\n"
    )


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_byte_fallback(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("你好🙂")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # The emoji is never learned: its four UTF-8 bytes come out as byte tokens.
    assert tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tokenizer.decode(ids) == "你好🙂"
    assert tokenizer.encode("\n") == [tokenizer.token_to_id("<0x0A>")]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a\nb"))[1] == "<0x0A>"


def test_byte_tokens_follow_control_tokens(tokenizer: Tokenizer) -> None:
    first_byte_id = len(CONTROL_TOKENS)
    assert [tokenizer.token_to_id(t) for t in BYTE_TOKENS] == list(
        range(first_byte_id, first_byte_id + 256)
    )


def test_vocab_size_and_unknown_ids(tiny_tokenizer: Tokenizer, mini_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.vocab_size == 512
    assert 2000 <= mini_tokenizer.vocab_size <= 32000
    # Random checkpoints have more embedding rows than the tokenizer has tokens.
    beyond = tiny_tokenizer.vocab_size + 7
    assert tiny_tokenizer.decode([beyond]) == ""
    assert tiny_tokenizer.convert_ids_to_tokens([3, beyond]) == ["<|im_start|>", None]
    with pytest.raises(ValueError, match="non-negative"):
        tiny_tokenizer.decode([5, -1])
    with pytest.raises(ValueError, match="must be a str"):
        tiny_tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_load_tokenizer(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tiny_tokenizer_dir), Tokenizer)
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_alone_still_loads(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    assert tokenizer.stop_token_ids_default() == [2, 4]
    assert tokenizer.all_special_ids == frozenset({0, 1, 2, 3, 4, 11, 12})


def _copy_with_config(source: Path, target: Path, **changes: object) -> Path:
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(changes)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_add_bos_token(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(
        _copy_with_config(tiny_tokenizer_dir, tmp_path, add_bos_token=True)
    )
    plain = tokenizer.encode("Hi")
    assert tokenizer.encode("Hi", add_special_tokens=True) == [1, *plain]


def test_config_only_added_token(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    decoder = dict(config["added_tokens_decoder"])
    decoder["512"] = {"content": "<mask:1>", "special": True}
    tokenizer = Tokenizer.from_pretrained(
        _copy_with_config(tiny_tokenizer_dir, tmp_path, added_tokens_decoder=decoder)
    )
    assert tokenizer.encode("a<mask:1>")[-1] == 512
    assert 512 in tokenizer.all_special_ids
    decoder["600"] = {"content": "<mask:2>", "special": True}
    _copy_with_config(tiny_tokenizer_dir, tmp_path, added_tokens_decoder=decoder)
    with pytest.raises(ValueError, match="at id 600"):
        Tokenizer.from_pretrained(tmp_path)


def test_special_tokens_map_overrides_config(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    _copy_with_config(tiny_tokenizer_dir, tmp_path, eos_token="<|end_of_sentence|>")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token_id == 4
    assert tokenizer.special_tokens["eos"] == "<|im_end|>"


def test_unknown_special_token_is_rejected() -> None:
    backend = build_tiny_tokenizer(512)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(backend, special_tokens={"eos": "<nope>"})
    with pytest.raises(ValueError, match="unknown special token roles"):
        Tokenizer(backend, special_tokens={"end": "</s>"})


@pytest.mark.parametrize("preset", ["tiny", "mini"])
def test_matches_transformers(preset: str, request) -> None:
    transformers = pytest.importorskip("transformers")
    directory = request.getfixturevalue(f"{preset}_tokenizer_dir")
    ours = Tokenizer.from_pretrained(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert theirs.bos_token_id == ours.bos_token_id
    assert theirs.eos_token_id == ours.eos_token_id
    assert theirs.pad_token_id == ours.pad_token_id
    assert len(theirs) == ours.vocab_size
    for text in SAMPLES:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.encode(text) == ours.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert theirs.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip)
        assert theirs.convert_ids_to_tokens(ids) == ours.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": "你好"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(
        messages
    )
