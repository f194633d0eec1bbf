"""ServingSettings: what the HTTP layer knows about the model it fronts (names, limits,
parsers, the input processor), resolved once at start-up from the checkpoint and the
CLI/config. `ServingSettings.from_checkpoint` is the one way to build them."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.inputs.model_facts import ModelFacts
from ernie_cluster.inputs.processor import InputProcessor
from ernie_cluster.serving.limits import DEFAULT_MAX_BODY_BYTES, RequestLimits
from ernie_cluster.serving.parsers import REASONING_PARSERS, TOOL_PARSERS
from ernie_cluster.tokenizer import Tokenizer, load_tokenizer


@dataclass
class ServingSettings:
    served_model_names: list[str]
    facts: ModelFacts
    tokenizer: Tokenizer | None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    api_key: str | None = None
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    auth_all_routes: bool = False
    """The API key guards /metrics and the API docs too (only /health stays open)."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """The operator's bounds on one request's work (stop strings, constraints, tools...)."""

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {self.reasoning_parser!r}; "
                f"choose one of {sorted(REASONING_PARSERS)}"
            )
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"unknown tool-call parser {self.tool_call_parser!r}; "
                f"choose one of {sorted(TOOL_PARSERS)}"
            )

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        served_model_names: list[str],
        max_model_len: int | None = None,
        *,
        model_config: ErnieMoeConfig | None = None,
        tokenizer: Tokenizer | None = None,
        **options,
    ) -> ServingSettings:
        """Settings for the checkpoint in `model_dir` (config and tokenizer are read unless
        given); `options` are the remaining fields (parsers, api_key, body limit)."""
        model_dir = Path(model_dir)
        model_config = model_config or ErnieMoeConfig.from_pretrained(model_dir)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        facts = ModelFacts.load(model_dir, model_config, tokenizer, max_model_len)
        return cls(served_model_names, facts, tokenizer, **options)

    @cached_property
    def system_fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: changes when the server's code or model setup does."""
        import hashlib

        import ernie_cluster

        material = f"{ernie_cluster.__version__}|{self.model_name}|{self.max_model_len}"
        return "fp_" + hashlib.blake2b(material.encode(), digest_size=5).hexdigest()

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @cached_property
    def processor(self) -> InputProcessor:
        return InputProcessor(self.facts, self.tokenizer)
