"""ServingSettings: what the HTTP layer knows about the model it fronts (names, limits,
parsers, defaults), resolved once at start-up from the checkpoint and the CLI/config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ernie_cluster.serving.parsers import REASONING_PARSERS, TOOL_PARSERS
from ernie_cluster.tokenizer import Tokenizer

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class ServingSettings:
    served_model_names: list[str]
    max_model_len: int
    tokenizer: Tokenizer | None
    vocab_size: int
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    api_key: str | None = None
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_sampling: dict[str, float] = field(default_factory=dict)
    """temperature / top_p from generation_config.json, used when a request omits them."""

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

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def generation_defaults(model_dir: Path) -> dict[str, float]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {k: float(raw[k]) for k in ("temperature", "top_p", "top_k") if k in raw}
