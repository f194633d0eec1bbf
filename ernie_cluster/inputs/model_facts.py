"""ModelFacts: what turning a request into engine input needs to know about the checkpoint,
read once from its directory (config, generation_config.json, tokenizer).

The engine and the HTTP ingress (which has no weights) build the same facts from the same
files, so both resolve a request identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ernie_cluster.config.engine_config import max_model_len_for
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.tokenizer import Tokenizer

GENERATION_CONFIG_FILE = "generation_config.json"
REASONING_END = "</think>"
ANSWER_START = "<response>"


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    """Rows of the model's logits; token ids must be below it."""
    max_model_len: int
    eos_token_ids: frozenset[int]
    """Ids that end generation unless `ignore_eos`: the config's, generation_config.json's and
    the tokenizer's turn ends."""
    default_sampling: dict[str, float] = field(default_factory=dict)
    """temperature / top_p / top_k from generation_config.json, for requests that omit them."""
    reasoning_end_token_id: int | None = None
    """The `</think>` token, where a constraint on the answer starts."""
    answer_start_token_id: int | None = None
    """The `<response>` token: the answer's text (what stop strings apply to, with a reasoning
    parser) starts after it and the one newline the format puts there."""

    @classmethod
    def load(
        cls,
        model_dir: Path,
        model_config: ErnieMoeConfig,
        tokenizer: Tokenizer | None,
        max_model_len: int | None = None,
    ) -> ModelFacts:
        generation = _read_generation_config(model_dir)
        eos = set(model_config.eos_token_ids)
        raw_eos = generation.get("eos_token_id")
        if raw_eos is not None:
            eos.update(int(e) for e in (raw_eos if isinstance(raw_eos, list) else [raw_eos]))
        if tokenizer is not None:
            eos.update(tokenizer.stop_token_ids_default())
        defaults = {
            k: float(generation[k]) for k in ("temperature", "top_p", "top_k") if k in generation
        }
        return cls(
            vocab_size=model_config.vocab_size,
            max_model_len=max_model_len_for(max_model_len, model_config),
            eos_token_ids=frozenset(eos),
            default_sampling=defaults,
            reasoning_end_token_id=tokenizer.token_to_id(REASONING_END) if tokenizer else None,
            answer_start_token_id=tokenizer.token_to_id(ANSWER_START) if tokenizer else None,
        )


def _read_generation_config(model_dir: Path) -> dict:
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return raw if isinstance(raw, dict) else {}
