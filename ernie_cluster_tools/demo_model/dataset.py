"""Token batches of demo conversations for training, loss on the assistant turn only.

Owns how an Example becomes ids: the prompt is rendered with the chat template and encoded on
its own, exactly as the server encodes a request, and the target is encoded on its own, as the
model's generated tokens are. Labels are -100 on the prompt. Batches group examples of similar
length so little of each batch is padding. Deterministic: a seed fixes every batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from ernie_cluster.tokenizer.chat_template import render_chat_template
from ernie_cluster_tools.demo_model.conversations import Example, generate_examples

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    """IGNORE_INDEX on prompt tokens, the token itself on target tokens."""


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded with pad_id
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor  # [B, T] long, 0 on padding


def render_prompt(chat_template: str, example: Example) -> str:
    return render_chat_template(chat_template, example.messages, tools=example.tools)


def encode_example(tokenizer: Tokenizer, chat_template: str, example: Example) -> EncodedExample:
    prompt = tokenizer.encode(render_prompt(chat_template, example), add_special_tokens=False).ids
    target = tokenizer.encode(example.target, add_special_tokens=False).ids
    return EncodedExample(prompt + target, [IGNORE_INDEX] * len(prompt) + target)


def collate(examples: list[EncodedExample], pad_id: int) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return Batch(input_ids, labels, mask)


def batch_stream(
    tokenizer: Tokenizer,
    chat_template: str,
    seed: int,
    batch_size: int,
    max_length: int,
    pad_id: int = 0,
    pool_batches: int = 8,
    name_pieces: Sequence[str] = (),
) -> Iterator[Batch]:
    """Endless batches of fresh training conversations (no example is drawn twice).

    Each pool of `pool_batches` batches is sorted by length, cut into batches, and the batches
    are shuffled, so a batch holds examples of similar length. Examples longer than
    `max_length` tokens are skipped.
    """
    if batch_size < 1 or pool_batches < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and pool_batches ({pool_batches}) must be >= 1"
        )
    order = random.Random(f"batches-{seed}")
    pool_size = batch_size * pool_batches
    for chunk in range(1 << 62):
        examples = generate_examples(
            pool_size, seed=seed * 1_000_003 + chunk, name_pieces=name_pieces
        )
        encoded = [encode_example(tokenizer, chat_template, e) for e in examples]
        encoded = sorted(
            (e for e in encoded if len(e.input_ids) <= max_length), key=lambda e: len(e.input_ids)
        )
        batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
        order.shuffle(batches)
        for batch in batches:
            yield collate(batch, pad_id)
