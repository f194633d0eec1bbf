"""Fixtures for the tokenizer tests: generated tokenizer directories and the model's template."""

from __future__ import annotations

from pathlib import Path

import pytest

from ernie_cluster.tokenizer import Tokenizer
from ernie_cluster_tools.fixtures.tiny_tokenizer import write_tokenizer_files

# shared/ sits beside the repository (the clone) in CI and at /work/shared locally.
REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
REFERENCE_TEMPLATE = REFERENCE_DIR / "ernie45_thinking_chat_template.jinja"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The `tiny` preset's tokenizer (512 ids: much text falls back to byte tokens)."""
    directory = tmp_path_factory.mktemp("tok_tiny")
    write_tokenizer_files(directory, vocab_size=512)
    return directory


@pytest.fixture(scope="session")
def mini_tokenizer_dir(tmp_path_factory) -> Path:
    """The `mini` preset's tokenizer (a few thousand learned pieces)."""
    directory = tmp_path_factory.mktemp("tok_mini")
    write_tokenizer_files(directory, vocab_size=32000)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def mini_tokenizer(mini_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(mini_tokenizer_dir)


@pytest.fixture(scope="session")
def reference_template() -> str:
    if not REFERENCE_TEMPLATE.is_file():
        pytest.skip(
            f"the model's reference chat template is not at {REFERENCE_TEMPLATE} "
            "(shared/reference must sit beside the repository)"
        )
    return REFERENCE_TEMPLATE.read_text(encoding="utf-8")
