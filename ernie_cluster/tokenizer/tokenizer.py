"""The engine's tokenizer: a `tokenizers.Tokenizer` plus the checkpoint's special tokens.

Owns reading tokenizer.json, tokenizer_config.json, special_tokens_map.json and the chat
template from a checkpoint directory, and text <-> id conversion. It never downloads files
(the loader resolves hub ids to directories first) and never streams (see detokenizer.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from ernie_cluster.tokenizer.chat_template import render_chat_template

__all__ = ["Tokenizer", "load_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Special-token roles passed to chat templates as variables (bos_token, eos_token, ...).
SPECIAL_TOKEN_ROLES = ("bos", "eos", "unk", "pad", "cls", "sep")
# Ends of a turn for ERNIE chat models; generation stops on any of them.
STOP_TOKENS = ("</s>", "<|im_end|>")
# Texts longer than this are encoded without holding the GIL.
_GIL_FREE_CHARS = 16_384


class Tokenizer:
    """Encodes and decodes text and renders chat prompts for one checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """`special_tokens` maps roles ("bos", "eos", "unk", "pad", "cls", "sep") to tokens."""
        self._backend = backend
        self._special_tokens = dict(special_tokens or {})
        unknown_roles = set(self._special_tokens) - set(SPECIAL_TOKEN_ROLES)
        if unknown_roles:
            raise ValueError(
                f"unknown special token roles {sorted(unknown_roles)}; "
                f"expected some of {SPECIAL_TOKEN_ROLES}"
            )
        for role, token in self._special_tokens.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"{role}_token {token!r} is not in the tokenizer's vocabulary")
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self._chat_template = chat_template
        role_ids = {self.token_to_id(token) for token in self._special_tokens.values()}
        flagged_ids = {
            i for i, token in backend.get_added_tokens_decoder().items() if token.special
        }
        self._all_special_ids = frozenset(i for i in role_ids | flagged_ids if i is not None)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory holding tokenizer.json (and optionally the rest)."""
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ValueError(f"no {TOKENIZER_FILE} in {str(directory)!r}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises bare Exception
            raise ValueError(f"cannot read {str(tokenizer_file)!r}: {exc}") from exc
        config = _read_json(directory / CONFIG_FILE)
        _apply_added_tokens(backend, config.get("added_tokens_decoder") or {}, directory)

        # As in transformers, special_tokens_map.json overrides tokenizer_config.json.
        special_tokens_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        special_tokens: dict[str, str] = {}
        for role in SPECIAL_TOKEN_ROLES:
            value = special_tokens_map.get(f"{role}_token", config.get(f"{role}_token"))
            token = _token_content(value)
            if token is not None and backend.token_to_id(token) is not None:
                special_tokens[role] = token

        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=_read_chat_template(directory, config),
        )

    # ---- text <-> ids ----

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; bos/eos are added only when asked and the config enables them."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        # NOTE: the backend's own post-processor is bypassed: whether bos/eos are added is the
        # config's add_bos_token/add_eos_token, as for ERNIE (both false).
        if len(text) > _GIL_FREE_CHARS:
            # NOTE: the tokenizers library holds the GIL in encode() but releases it in
            # encode_batch(), so a long text tokenized on a worker thread leaves the event
            # loop (and everything else in the process) running.
            ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self._add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids beyond the vocabulary (a model's padded rows) decode to nothing."""
        return self._backend.decode(_checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Token strings; None for ids beyond the vocabulary."""
        return [self._backend.id_to_token(i) for i in _checked_ids(ids)]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def to_json_str(self) -> str:
        """The backend tokenizer as tokenizer.json text (for libraries that inspect it)."""
        return self._backend.to_str()

    # ---- special tokens ----

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_token_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_token_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) may drop, and the role tokens."""
        return self._all_special_ids

    @cached_property
    def added_token_pattern(self) -> re.Pattern[str] | None:
        """Matches the text of any added token (`<|im_start|>`, `<s>`, `<think>`, `</tool_call>`
        ...): what `skip_special_tokens` removes from text that parsers had to see whole."""
        texts = sorted(
            {token.content for token in self._backend.get_added_tokens_decoder().values()},
            key=len,
            reverse=True,
        )
        texts = [t for t in texts if t]
        return re.compile("|".join(re.escape(t) for t in texts)) if texts else None

    @cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest token string: a text of N characters has at least
        N / max_token_chars tokens, which bounds a prompt's size before tokenizing it."""
        vocab = self._backend.get_vocab(with_added_tokens=True)
        return max((len(piece) for piece in vocab), default=1)

    @cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback tokens <0x00>..<0xFF> (empty for byte-level BPE)."""
        ids = (self._backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Role -> token text, e.g. {"bos": "<s>", "eos": "</s>"}."""
        return dict(self._special_tokens)

    def stop_token_ids_default(self) -> list[int]:
        """Ids that end a generation by default: </s>, <|im_end|> and the eos token."""
        candidates = [self.token_to_id(token) for token in STOP_TOKENS] + [self.eos_token_id]
        return list(dict.fromkeys(i for i in candidates if i is not None))

    # ---- chat ----

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any] | Any],
        tools: Sequence[Mapping[str, Any] | Any] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; special tokens are template variables, as in HF."""
        if self._chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template.jinja and no "
                "chat_template in tokenizer_config.json); send a plain prompt instead"
            )
        variables = {f"{role}_token": token for role, token in self._special_tokens.items()}
        variables.update(template_kwargs)
        return render_chat_template(
            self._chat_template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def _role_id(self, role: str) -> int | None:
        token = self._special_tokens.get(role)
        return None if token is None else self._backend.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self._special_tokens}, "
            f"chat_template={'yes' if self._chat_template else 'no'})"
        )


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when the directory has no tokenizer.json.

    Without a tokenizer the engine works on token ids only and returns empty text.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} does not exist")
    if not (directory / TOKENIZER_FILE).is_file():
        return None
    return Tokenizer.from_pretrained(directory)


def _checked_ids(ids: Iterable[int]) -> list[int]:
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"token ids must be non-negative ints, got {bad[:8]}")
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """A token from a config entry: a plain string or an AddedToken-style dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _apply_added_tokens(
    backend: tokenizers.Tokenizer, added_tokens_decoder: Mapping[str, Any], directory: Path
) -> None:
    """Add config-only added tokens to the backend; a token at another id is an error."""
    for id_text, entry in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        content = _token_content(entry)
        if content is None:
            raise ValueError(f"added_tokens_decoder[{id_text!r}] has no content: {entry!r}")
        expected_id = int(id_text)
        actual_id = backend.token_to_id(content)
        if actual_id is None:
            fields = {k: bool(entry.get(k, False)) for k in ("single_word", "lstrip", "rstrip")}
            token = tokenizers.AddedToken(
                content,
                normalized=bool(entry.get("normalized", False)),
                special=bool(entry.get("special", False)),
                **fields,
            )
            backend.add_tokens([token])
            actual_id = backend.token_to_id(content)
        if actual_id != expected_id:
            raise ValueError(
                f"{CONFIG_FILE} in {str(directory)!r} puts {content!r} at id {expected_id} "
                f"but {TOKENIZER_FILE} has it at id {actual_id}"
            )


def _read_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja if present, else tokenizer_config's chat_template ("default" entry)."""
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {
            entry.get("name"): entry.get("template")
            for entry in template
            if isinstance(entry, Mapping)
        }
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"chat_template in {CONFIG_FILE} of {str(directory)!r} must be a string or a list of "
            f"{{name, template}} entries, got {type(template).__name__}"
        )
    return template or None
