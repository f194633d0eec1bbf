"""SamplingParams: how one request's tokens are chosen and when it stops, and
StructuredOutputsParams: what its output must match (public API).

Validation lives here so every entry point (Python, HTTP) rejects the same bad values with
the same message. Sampling itself is in `ernie_cluster.sample`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MODEL_DEFAULTS: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
"""Sampling fields a request may leave out (None) to get the checkpoint's generation config;
these neutral values apply where the checkpoint sets none."""
MAX_LOGIT_BIAS = 100.0

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint on the generated text (names as in vLLM's `structured_outputs`).

    Set as `SamplingParams(structured_outputs=...)`, or from the HTTP fields `response_format`,
    `structured_outputs`, `guided_*` and strict tools. The engine compiles it into a
    `structured_output.params.GrammarSpec`.
    """

    json: dict[str, Any] | str | None = None
    """A JSON schema (a dict or its JSON text): the output is one JSON value matching it."""
    regex: str | None = None
    """The output matches this regular expression as a whole."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar / GBNF syntax, with a `root` rule)."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    structural_tag: dict[str, Any] | str | None = None
    """An xgrammar structural tag (dict or JSON text), for callers that build their own."""

    def __post_init__(self) -> None:
        chosen = [kind for kind in _STRUCTURED_KINDS if self._is_set(kind)]
        if len(chosen) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(_STRUCTURED_KINDS)}; "
                f"got {chosen or 'none'}"
            )

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        return value is not False and value is not None

    @property
    def kind(self) -> str:
        return next(kind for kind in _STRUCTURED_KINDS if self._is_set(kind))

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions returned for the prompt."""
    temperature: float | None = None
    """0 means greedy. None (left out): the model's default (see `MODEL_DEFAULTS`)."""
    top_p: float | None = None
    """None (left out): the model's default."""
    top_k: int | None = None
    """0 or -1 disables top-k. None (left out): the model's default."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Same seed and prompt give the same tokens whatever else shares the batch."""
    max_tokens: int | None = 16
    """None: up to the model's context length. 0: the request ends once its prompt is
    computed, sampling nothing (for `prompt_logprobs`, e.g. scoring a text)."""
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output is cut before the stop string."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation, on top of the model's end-of-sequence ids."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Number of top alternatives per token (the sampled token is always included)."""
    prompt_logprobs: int | None = None
    """None: off. k >= 0: the logprob of each prompt token given the tokens before it, plus its
    top-k alternatives (vLLM's meaning); the whole prompt is recomputed (no prefix-cache hit)."""
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling, in [-100, 100] (OpenAI's)."""
    structured_outputs: StructuredOutputsParams | None = None
    """A JSON schema, regex, choice or grammar the output must match (a dict is accepted)."""
    model_default_fields: frozenset[str] = field(
        default=frozenset(), init=False, repr=False, compare=False
    )
    """The fields of `MODEL_DEFAULTS` left out (None): they hold the neutral value until the
    input processor puts the checkpoint's generation_config.json values there
    (`with_model_defaults`), for `LLM.generate` and HTTP alike."""

    def __post_init__(self) -> None:
        self.model_default_fields = frozenset(
            name for name in MODEL_DEFAULTS if getattr(self, name) is None
        )
        for name in self.model_default_fields:
            setattr(self, name, MODEL_DEFAULTS[name])
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        else:
            self.logit_bias = None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**_known(self.structured_outputs))
        self.validate()

    def with_model_defaults(self, defaults: Mapping[str, float]) -> SamplingParams:
        """A copy whose left-out fields take the model's `defaults` (generation_config.json's
        temperature / top_p / top_k); the fields the caller set are kept."""
        chosen = {name: defaults[name] for name in self.model_default_fields if name in defaults}
        if not chosen:
            return self
        resolved = copy.copy(self)
        for name, value in chosen.items():
            setattr(resolved, name, type(MODEL_DEFAULTS[name])(value))
        if resolved.top_k == -1:
            resolved.top_k = 0
        resolved.model_default_fields = self.model_default_fields - set(chosen)
        resolved.validate()
        return resolved

    def resolve_stop_token_ids(self, eos_token_ids: Iterable[int]) -> frozenset[int]:
        """Ids that end a sample: eos (unless `ignore_eos`) plus `stop_token_ids`."""
        eos = frozenset() if self.ignore_eos else frozenset(int(t) for t in eos_token_ids)
        return frozenset(self.stop_token_ids) | eos

    def validate(self) -> None:
        checks: list[tuple[bool, str, object]] = [
            (isinstance(self.n, int) and self.n >= 1, "n must be >= 1", self.n),
            (self.temperature >= 0.0, "temperature must be >= 0", self.temperature),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", self.top_p),
            (self.top_k >= 0, "top_k must be >= 0 (or -1 to disable)", self.top_k),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", self.min_p),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty must be in [-2, 2]",
                self.presence_penalty,
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty must be in [-2, 2]",
                self.frequency_penalty,
            ),
            (
                self.repetition_penalty > 0.0,
                "repetition_penalty must be > 0",
                self.repetition_penalty,
            ),
            (
                self.max_tokens is None or self.max_tokens >= 0,
                "max_tokens must be >= 0",
                self.max_tokens,
            ),
            (self.min_tokens >= 0, "min_tokens must be >= 0", self.min_tokens),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens must be <= max_tokens ({self.max_tokens})",
                self.min_tokens,
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}]",
                self.logprobs,
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
                self.prompt_logprobs,
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty",
                self.stop,
            ),
            (
                all(t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be >= 0",
                self.stop_token_ids,
            ),
        ]
        bias = self.logit_bias or {}
        checks.append(
            (
                all(-MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS for v in bias.values()),
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                bias,
            )
        )
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {value!r}")


def _known(raw: dict[str, Any]) -> dict[str, Any]:
    fields = StructuredOutputsParams.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown structured_outputs fields {unknown}; valid: {sorted(fields)}")
    return raw
