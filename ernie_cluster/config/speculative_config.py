"""Speculative decoding settings (`--speculative-config`, vLLM's flag and JSON shape).

One declaration of what an operator may set: the method and how many tokens it proposes per
step, plus each method's own knobs under vLLM's names. The proposers themselves live in
`engine/speculative/` (a draft model's forwards in worker/draft_runner, the MTP layer's in
worker/mtp_runner); the verification rides in the normal step (worker/model_runner).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SpeculativeMethod = Literal["ngram", "suffix", "draft_model", "ernie_mtp"]
MODEL_METHODS = ("draft_model", "ernie_mtp")
"""The methods whose proposals a model makes in the worker after each step."""


class SpeculativeConfig(BaseModel):
    """`{"method": "ngram", "num_speculative_tokens": 4, ...}`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: SpeculativeMethod = Field(
        description="ngram: prompt lookup over the request's own tokens; suffix: a suffix "
        "structure over the request's tokens and recent outputs of other requests; "
        "draft_model: greedy tokens of a small checkpoint with the same vocabulary (`model`); "
        "ernie_mtp: greedy tokens of the target checkpoint's own MTP layer (`mtp_*` weights, "
        "ERNIE-4.5 PT checkpoints; one layer, repeated for k > 1; tensor_parallel_size 1)"
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
    model: str | None = Field(
        None,
        description="draft_model: the draft checkpoint (directory or Hugging Face repo id), "
        "same vocabulary as the target; run unsharded on rank 0 in the target's dtype",
    )
    draft_tensor_parallel_size: int | None = Field(
        None, description="draft_model: shards of the draft (only 1: it runs on rank 0 alone)"
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

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a sequence needs past its step for the draft's proposals: k with
        draft_model (worker/draft_runner) and ernie_mtp (worker/mtp_runner: the proposal count
        it reads; it writes k - 1 of them), 0 for the methods without a model."""
        return self.num_speculative_tokens if self.method in MODEL_METHODS else 0

    @model_validator(mode="after")
    def _check_method_fields(self) -> SpeculativeConfig:
        if self.method == "draft_model" and not self.model:
            raise ValueError(
                "method 'draft_model' needs the draft checkpoint: "
                '{"method": "draft_model", "model": "<path or repo id>", ...}'
            )
        if self.method != "draft_model" and self.model is not None:
            without = (
                "reads the target checkpoint's own mtp_* weights"
                if self.method == "ernie_mtp"
                else "proposes without one"
            )
            raise ValueError(
                f"model ({self.model!r}) is the draft checkpoint of method 'draft_model'; "
                f"method {self.method!r} {without}"
            )
        if self.draft_tensor_parallel_size not in (None, 1):
            raise ValueError(
                f"draft_tensor_parallel_size must be 1 (the draft runs unsharded on rank 0), "
                f"got {self.draft_tensor_parallel_size}"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )
        return self
