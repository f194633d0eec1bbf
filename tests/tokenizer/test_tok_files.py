"""The generated tokenizer files: determinism, layout and the size limits of each preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ernie_cluster_tools.fixtures.tiny_tokenizer import (
    CHAT_TEMPLATE_FILE,
    CONTROL_TOKENS,
    build_tiny_tokenizer,
    write_tokenizer_files,
)

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@pytest.mark.parametrize("vocab_size", [512, 32000])
def test_same_arguments_give_identical_files(tmp_path: Path, vocab_size: int) -> None:
    write_tokenizer_files(tmp_path / "a", vocab_size)
    write_tokenizer_files(tmp_path / "b", vocab_size)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_files_identical_across_processes(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    # Hash seeds and thread counts differ between processes; the files must not.
    script = (
        "import sys; from pathlib import Path; "
        "from ernie_cluster_tools.fixtures.tiny_tokenizer import write_tokenizer_files; "
        "write_tokenizer_files(Path(sys.argv[1]), 512)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes(), name


def test_files_written(tiny_tokenizer_dir: Path) -> None:
    assert sorted(p.name for p in tiny_tokenizer_dir.iterdir()) == sorted(FILES)
    assert (
        tiny_tokenizer_dir / "chat_template.jinja"
    ).read_bytes() == CHAT_TEMPLATE_FILE.read_bytes()
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
        "<unk>",
    )
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["5"] == {
        "content": "<think>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": False,
    }
    added = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in added] == [
        (i, content, special) for i, (content, special) in enumerate(CONTROL_TOKENS)
    ]


@pytest.mark.parametrize("vocab_size", [400, 512, 1000, 32000, 103424])
def test_vocab_never_exceeds_request(vocab_size: int) -> None:
    assert build_tiny_tokenizer(vocab_size).get_vocab_size(with_added_tokens=True) <= vocab_size


def test_mini_is_fast_and_sizeable() -> None:
    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer(32000)
    assert time.perf_counter() - start < 3.0
    assert tokenizer.get_vocab_size() >= 2000


def test_too_small_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        build_tiny_tokenizer(300)
