"""Typed view of an ERNIE-4.5 checkpoint's config.json: `ernie4_5_moe` (the 21B-A3B) or the
dense `ernie4_5` (0.3B).

Owns parsing, defaults and cross-field validation of the model architecture. It never
touches tensors; everything downstream reads the architecture from `ErnieMoeConfig`. A dense
checkpoint is the same decoder with no MoE layer (every layer the dense SwiGLU MLP; attention,
RoPE, norms and the tied head are identical in transformers' two implementations), so it maps
to an `ErnieMoeConfig` whose moe_* fields say "no MoE".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MOE_MODEL_TYPE = "ernie4_5_moe"
DENSE_MODEL_TYPE = "ernie4_5"
SUPPORTED_MODEL_TYPES = (MOE_MODEL_TYPE, DENSE_MODEL_TYPE)
SUPPORTED_ACTIVATIONS = ("silu",)

DENSE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 128,
}
"""transformers' Ernie4_5Config defaults (ERNIE-4.5-0.3B) where they differ from ours: a dense
config.json that leaves a key out means these. NOTE: head_dim 128 is not hidden // heads (64)."""

NO_MOE: dict[str, Any] = {
    "moe_num_experts": 0,
    "moe_k": 0,
    "moe_num_shared_experts": 0,
    "moe_intermediate_size": 0,
    "moe_layer_start_index": 0,
    "moe_layer_end_index": -1,
}
"""The moe_* values of a dense model: no experts and an empty layer range [0, -1]."""


@dataclass(frozen=True)
class ErnieMoeConfig:
    """Architecture of an ERNIE-4.5 model (defaults: ERNIE-4.5-21B-A3B); for a dense
    checkpoint `moe_layer_ids` is empty."""

    vocab_size: int = 103424
    hidden_size: int = 2560
    intermediate_size: int = 12288
    """Width of the dense SwiGLU MLP used by the non-MoE layers."""
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    head_dim: int = 128
    """Defaults to hidden_size // num_attention_heads when config.json omits it."""
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_bias: bool = False
    tie_word_embeddings: bool = True
    moe_intermediate_size: int = 1536
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = 27
    """Inclusive; -1 in an `ernie4_5_moe` config.json means the last layer (a dense model's
    range is [0, -1]: empty)."""
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Unknown keys of config.json, kept for reference only; they never change inference."""

    def __post_init__(self) -> None:
        self._validate()

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ErnieMoeConfig:
        model_type = raw.get("model_type", MOE_MODEL_TYPE)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        dense = model_type == DENSE_MODEL_TYPE
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "eos_token_ids")}
        if dense:  # NOTE: transformers' dense model reads no moe_* key; they stay in `extra`
            known -= set(NO_MOE) | {"moe_layer_interval", "moe_norm_min"}
        values: dict[str, Any] = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        if dense:
            absent = {k: v for k, v in DENSE_DEFAULTS.items() if k not in raw}
            values = {**absent, **values, **NO_MOE}

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rope_type not in ("default", None):
            raise ValueError(f"rope_type {rope_type!r} is not supported; only 'default' RoPE is")

        num_layers = int(values.get("num_hidden_layers", cls.num_hidden_layers))
        if not dense and values.get("moe_layer_end_index", -1) == -1:
            values["moe_layer_end_index"] = num_layers - 1
        if "head_dim" not in values:
            hidden = int(values.get("hidden_size", cls.hidden_size))
            heads = int(values.get("num_attention_heads", cls.num_attention_heads))
            if heads <= 0 or hidden % heads:
                raise ValueError(
                    f"hidden_size ({hidden}) must be a positive multiple of "
                    f"num_attention_heads ({heads}) when head_dim is not given"
                )
            values["head_dim"] = hidden // heads
        if "num_key_value_heads" not in values:
            values["num_key_value_heads"] = values.get(
                "num_attention_heads", cls.num_attention_heads
            )

        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        dtype = raw.get("torch_dtype", raw.get("dtype", "bfloat16"))
        values["torch_dtype"] = str(dtype).replace("torch.", "")
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(eos_token_ids=tuple(int(e) for e in eos_ids), extra=extra, **values)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ErnieMoeConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    # ----------------------------------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            (layer_idx + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= layer_idx <= self.moe_layer_end_index
        )

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.moe_num_shared_experts

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "moe_layer_interval",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; expected {SUPPORTED_ACTIVATIONS}"
            )
        if self.use_bias:
            raise ValueError("use_bias=True is not supported: ERNIE-4.5 checkpoints have no biases")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"rms_norm_eps ({self.rms_norm_eps}) and rope_theta ({self.rope_theta}) must be > 0"
            )
        if self.moe_num_experts < 1 and self.moe_layer_ids:
            raise ValueError(f"moe_num_experts must be >= 1, got {self.moe_num_experts}")
        if self.moe_layer_ids and (
            not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0
        ):
            raise ValueError(
                f"moe_intermediate_size must be a positive integer, got {self.moe_intermediate_size!r}"
            )
        if self.moe_layer_ids and not 1 <= self.moe_k <= self.moe_num_experts:
            raise ValueError(
                f"moe_k ({self.moe_k}) must be between 1 and moe_num_experts "
                f"({self.moe_num_experts})"
            )
        if self.moe_num_shared_experts < 0:
            raise ValueError(
                f"moe_num_shared_experts must be >= 0, got {self.moe_num_shared_experts}"
            )
        if self.moe_layer_start_index < 0:
            raise ValueError(
                f"moe_layer_start_index must be >= 0, got {self.moe_layer_start_index}"
            )
        if self.moe_layer_end_index >= self.num_hidden_layers:
            raise ValueError(
                f"moe_layer_end_index ({self.moe_layer_end_index}) must be < num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        for tok_name in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, tok_name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ValueError(
                    f"{tok_name} ({tok}) is outside the vocabulary [0, {self.vocab_size})"
                )
