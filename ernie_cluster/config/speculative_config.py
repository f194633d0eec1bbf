"""Speculative decoding settings (`--speculative-config`, vLLM's flag and JSON shape).

One declaration of what an operator may set: the method and how many tokens it proposes per
step, plus each method's own knobs under vLLM's names. The proposers themselves live in
`engine/speculative/`; the verification rides in the normal step (worker/model_runner).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SpeculativeMethod = Literal["ngram", "suffix"]


class SpeculativeConfig(BaseModel):
    """`{"method": "ngram", "num_speculative_tokens": 4, ...}`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: SpeculativeMethod = Field(
        description="ngram: prompt lookup over the request's own tokens; suffix: a suffix "
        "structure over the request's tokens and recent outputs of other requests"
    )
    num_speculative_tokens: int = Field(
        ge=1, le=32, description="most tokens proposed per sequence and step (k)"
    )
    min_acceptance: float = Field(
        0.3,
        ge=0,
        le=1,
        description="propose the n-th token of a step only while the sequence's recent "
        "acceptance rate to the power n stays above this (0: always k); a sequence whose "
        "proposals keep failing proposes one token every 16 steps",
    )
    prompt_lookup_min: int = Field(
        2, ge=1, description="ngram: shortest suffix of the sequence matched earlier in it"
    )
    prompt_lookup_max: int = Field(
        5, ge=1, description="ngram: longest suffix tried first (longer matches predict better)"
    )
    suffix_decoding_max_tree_depth: int = Field(
        24, ge=1, description="suffix: longest context suffix indexed and matched, tokens"
    )
    suffix_decoding_max_cached_requests: int = Field(
        1000,
        ge=0,
        description="suffix: finished requests whose outputs stay indexed (oldest dropped)",
    )
    suffix_decoding_max_spec_factor: float = Field(
        1.0,
        gt=0,
        description="suffix: propose at most factor x (matched length) tokens, capped at k",
    )
    suffix_decoding_min_token_prob: float = Field(
        0.1,
        ge=0,
        le=1,
        description="suffix: stop a proposal at a token seen after the match less often than this",
    )

    @model_validator(mode="after")
    def _check_lookup(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )
        return self
