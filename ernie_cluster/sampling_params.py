"""SamplingParams: how one request's tokens are chosen and when it stops (public API).

Validation lives here so every entry point (Python, HTTP) rejects the same bad values with
the same message. Sampling itself is in `ernie_cluster.sample`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ernie_cluster.structured_output.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions returned for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Same seed and prompt give the same tokens whatever else shares the batch."""
    max_tokens: int | None = 16
    """None: up to the model's context length."""
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output is cut before the stop string."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation, on top of the model's end-of-sequence ids."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Number of top alternatives per token (the sampled token is always included)."""
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling, in [-100, 100] (OpenAI's)."""
    structured_outputs: StructuredOutputsParams | None = None
    """A JSON schema, regex, choice or grammar the output must match (a dict is accepted)."""

    def __post_init__(self) -> None:
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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

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
                self.max_tokens is None or self.max_tokens >= 1,
                "max_tokens must be >= 1",
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
