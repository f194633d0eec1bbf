"""What the load generator sends: sessions of one or more requests.

Every dataset is a stream of `Session`s. A session hands out its requests one at a time and
sees each reply before making the next, so a multi-turn conversation can carry the model's
real answers forward (and share its growing prefix with the server's prefix cache). The
single-request datasets (random, JSONL) are sessions of one turn.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ernie_cluster.tokenizer import Tokenizer


@dataclass
class BenchRequest:
    """One HTTP request: `messages` for /v1/chat/completions, `prompt` for /v1/completions."""

    max_tokens: int
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    session_id: str | None = None
    turn: int = 0

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a BenchRequest needs exactly one of messages and prompt")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Reply:
    """What a session learns from the previous turn's response."""

    text: str
    prompt_tokens: int
    output_tokens: int


class Session(Protocol):
    session_id: str

    def next_request(self, previous: Reply | None) -> BenchRequest | None:
        """The next request, or None when the session is over (also after a failed turn)."""


@dataclass
class SingleRequest:
    request: BenchRequest
    session_id: str = ""
    _sent: bool = False

    def next_request(self, previous: Reply | None) -> BenchRequest | None:
        if self._sent:
            return None
        self._sent = True
        return self.request


@dataclass
class Conversation:
    """A chat that grows turn by turn: system prompt, then user message / real reply pairs.

    It ends after `num_turns` turns, or earlier once the next prompt would pass
    `max_context_tokens` (the server's count of the last prompt plus this turn's growth).
    """

    session_id: str
    system_prompt: str
    user_messages: list[str]
    max_tokens: int
    max_context_tokens: int | None = None
    user_message_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 0

    def next_request(self, previous: Reply | None) -> BenchRequest | None:
        if self.turn > 0:
            if previous is None:
                return None  # a failed turn ends the conversation
            self.history.append({"role": "assistant", "content": previous.text})
            growth = previous.output_tokens + self.user_message_tokens + self.max_tokens
            if (
                self.max_context_tokens is not None
                and previous.prompt_tokens + growth > self.max_context_tokens
            ):
                return None
        if self.turn >= len(self.user_messages):
            return None
        if not self.history and self.system_prompt:
            self.history.append({"role": "system", "content": self.system_prompt})
        self.history.append({"role": "user", "content": self.user_messages[self.turn]})
        self.turn += 1
        return BenchRequest(
            max_tokens=self.max_tokens,
            messages=list(self.history),
            session_id=self.session_id,
            turn=self.turn - 1,
        )


# ---------------------------------------------------------------------------- random text
@dataclass
class TextSampler:
    """Random token ids of a given length and their text, from the served model's tokenizer.

    Special and byte-fallback tokens are never drawn (a lone byte decodes to U+FFFD, which
    re-tokenizes as three bytes), so the text re-tokenizes to about the same length.
    """

    tokenizer: Tokenizer
    rng: random.Random
    _ordinary_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        special = self.tokenizer.all_special_ids | self.tokenizer.byte_token_ids
        self._ordinary_ids = [i for i in range(self.tokenizer.vocab_size) if i not in special]
        if not self._ordinary_ids:
            raise ValueError("the tokenizer has no ordinary tokens to build prompts from")

    def token_ids(self, length: int) -> list[int]:
        return self.rng.choices(self._ordinary_ids, k=length)

    def text(self, length: int) -> str:
        return self.tokenizer.decode(self.token_ids(length))


def sample_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """A length drawn uniformly from [mean * (1 - r), mean * (1 + r)], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, round(mean * (1.0 - range_ratio)))
    high = max(low, round(mean * (1.0 + range_ratio)))
    return rng.randint(low, high)


@dataclass
class RandomDataset:
    """Prompts of random tokens, input and output lengths uniform around their means.

    For /v1/completions the prompt goes as token ids (exact length); for chat as text.
    """

    sampler: TextSampler
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    chat: bool = True

    def sessions(self) -> Iterator[Session]:
        rng = self.sampler.rng
        index = 0
        while True:
            in_len = sample_length(rng, self.input_len, self.range_ratio)
            out_len = sample_length(rng, self.output_len, self.range_ratio)
            ids = self.sampler.token_ids(in_len)
            text = self.sampler.tokenizer.decode(ids)
            request = BenchRequest(
                max_tokens=out_len,
                messages=[{"role": "user", "content": text}] if self.chat else None,
                prompt=None if self.chat else ids,
            )
            yield SingleRequest(request, session_id=f"random-{index}")
            index += 1


@dataclass
class MultiTurnDataset:
    """Conversations sharing one system prompt, each growing by a user message and the real
    reply per turn toward `max_context_tokens`."""

    sampler: TextSampler
    num_turns: int
    system_prompt_len: int
    user_len: int
    output_len: int
    max_context_tokens: int | None = None
    session_prefix: str = "session"

    def sessions(self) -> Iterator[Session]:
        if self.num_turns < 1:
            raise ValueError(f"turns per session must be >= 1, got {self.num_turns}")
        system = self.sampler.text(self.system_prompt_len) if self.system_prompt_len else ""
        index = 0
        while True:
            yield Conversation(
                session_id=f"{self.session_prefix}-{index}",
                system_prompt=system,
                user_messages=[self.sampler.text(self.user_len) for _ in range(self.num_turns)],
                max_tokens=self.output_len,
                max_context_tokens=self.max_context_tokens,
                user_message_tokens=self.user_len,
            )
            index += 1


@dataclass
class JsonlDataset:
    """One request per line: {"prompt": ...} or {"messages": [...]}, optional "max_tokens"
    (else `default_max_tokens`). Lines are replayed in order, cycling when `cycle` is set."""

    path: Path
    default_max_tokens: int
    chat: bool = True
    cycle: bool = False
    records: list[BenchRequest] = field(init=False)

    def __post_init__(self) -> None:
        self.records = [
            self._parse(number, line)
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1)
            if line.strip()
        ]
        if not self.records:
            raise ValueError(f"{str(self.path)!r} holds no requests")

    def _parse(self, number: int, line: str) -> BenchRequest:
        where = f"{self.path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise ValueError(f'{where}: need an object with exactly one of "prompt", "messages"')
        max_tokens = item.get("max_tokens", self.default_max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be a positive int, got {max_tokens!r}")
        messages = item.get("messages")
        prompt = item.get("prompt")
        if messages is not None and not isinstance(messages, list):
            raise ValueError(f"{where}: messages must be a list")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: prompt must be a string")
        if self.chat and messages is None:
            messages, prompt = [{"role": "user", "content": prompt}], None
        if not self.chat and prompt is None:
            raise ValueError(f"{where}: the completions endpoint needs a prompt, not messages")
        return BenchRequest(max_tokens=max_tokens, messages=messages, prompt=prompt)

    def sessions(self) -> Iterator[Session]:
        index = 0
        while True:
            for record in self.records:
                yield SingleRequest(
                    BenchRequest(
                        max_tokens=record.max_tokens,
                        messages=record.messages,
                        prompt=record.prompt,
                    ),
                    session_id=f"jsonl-{index}",
                )
                index += 1
            if not self.cycle:
                return
