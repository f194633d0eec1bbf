"""The demo model's tokenizer: a small BPE learned from the demo conversations.

Owns the piece boundaries; tiny_tokenizer assembles the BPE and writes its files. ERNIE's
control tokens keep the low ids of the generated test checkpoints, then come the 256
byte-fallback tokens, then learned pieces.
Every run of letters is a word of its own, without the space before it: a city is then the
same pieces in a question (`in Paris`), in JSON (`"Paris"`) and in a tool result, so the model
learns to copy pieces instead of memorising names. Digits are single tokens for the same
reason. Deterministic: the same texts and vocab_size give byte-identical files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, models, normalizers, trainers
from tokenizers import pre_tokenizers as pre

from ernie_cluster_tools.fixtures.tiny_tokenizer import (
    BYTE_TOKENS,
    CONTROL_TOKENS,
    METASPACE,
    assemble_bpe,
    trained_pieces,
)

# A word: a run of letters, one digit, or a run of anything else (spaces, punctuation).
_PIECE_PATTERN = r"\p{L}+|\p{N}|[^\p{L}\p{N}]+"
_SPECIAL_SPLIT = re.compile("|".join(re.escape(content) for content, _ in CONTROL_TOKENS) + "|\n")
MIN_VOCAB_SIZE = len(CONTROL_TOKENS) + len(BYTE_TOKENS) + 128


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn pieces from `texts` (rendered conversations); at most `vocab_size` ids in all."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    num_fixed = len(CONTROL_TOKENS) + len(BYTE_TOKENS)
    pieces, merges = _learn_pieces(_training_lines(texts), vocab_size - num_fixed)
    return assemble_bpe(pieces, merges, _pre_tokenizer(), _normalizer())


def word_pieces(tokenizer: Tokenizer) -> list[str]:
    """Learned pieces made of ASCII letters only, in id order: what made-up names are built
    from, so every such piece is trained in the place of a name (see conversations.py)."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    return [p for p in sorted(vocab, key=vocab.__getitem__) if p.isascii() and p.isalpha()]


# NOTE: spaces become the metaspace as in ERNIE's SentencePiece vocabulary, but a space is
# never glued to the word after it (see the module docstring).
def _normalizer() -> normalizers.Normalizer:
    return normalizers.Replace(" ", METASPACE)


def _pre_tokenizer() -> pre.PreTokenizer:
    return pre.Split(Regex(_PIECE_PATTERN), behavior="isolated")


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """The texts cut at control tokens and newlines: no piece learns either (a newline is
    always the byte token <0x0A>, as in the real model)."""
    for text in texts:
        for part in _SPECIAL_SPLIT.split(text):
            if part:
                yield part


def _learn_pieces(lines: Iterator[str], max_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    trainer = trainers.BpeTrainer(vocab_size=max_pieces, min_frequency=4, show_progress=False)
    scratch = Tokenizer(models.BPE(unk_token=None))
    scratch.normalizer = _normalizer()
    scratch.pre_tokenizer = _pre_tokenizer()
    scratch.train_from_iterator(lines, trainer=trainer)
    return trained_pieces(scratch, max_pieces)
