"""Engine settings, each declared once: what model, how it is split, how the KV cache, the
scheduler and grammar compiles are sized.

`EngineSettings` is the one declaration (name, type, default, help, bounds) of every setting an
operator sets: the CLI flags (cli/model_args.py) and the Serve config (`ServeAppConfig`
inherits it) are made from its fields, and `EngineConfig` adds the Python-API-only ones. A bad
value raises `ValueError` naming the setting and the number; `max_model_len`'s default (the
checkpoint's) is decided by `max_model_len_for` alone.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.config.speculative_config import SpeculativeConfig

AttentionBackend = Literal["auto", "triton", "torch"]
ATTENTION_BACKENDS = get_args(AttentionBackend)
Quantization = Literal["wint8", "wint4", "fp8", "block_wise_fp8"]
QUANTIZATION_METHODS = get_args(Quantization)
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3"]
GRAMMAR_GROUP = {"group": "structured outputs (grammar compiles)"}
"""CLI help group of the grammar settings (a field's `json_schema_extra`; see cli/model_args)."""


def max_model_len_for(requested: int | None, model_config: ErnieMoeConfig) -> int:
    """Longest prompt + output: as requested, else the checkpoint's max_position_embeddings."""
    return requested if requested is not None else model_config.max_position_embeddings


class EngineSettings(BaseModel):
    """Engine settings an operator sets (CLI flag, Serve/Helm config field, `LLM` argument)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None,
        description="checkpoint directory or Hugging Face repo id (unset: the built-in demo "
        "checkpoint, shipped inside the package)",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight and activation dtype ('auto': the checkpoint's)"
    )
    quantization: Quantization | None = Field(
        None,
        description="quantize the weights at load, per rank after sharding: wint8 (int8, a "
        "scale per output channel), wint4 (int4 in groups of 128 input columns), fp8 (e4m3, a "
        "scale per output channel), block_wise_fp8 (e4m3, a scale per 128 input columns); "
        "experts, shared experts, dense MLP and attention projections; activations stay in "
        "the model dtype (unset: the checkpoint's weights as they are)",
    )
    kv_cache_dtype: KVCacheDtype = Field(
        "auto",
        description="KV cache element type ('auto': the model dtype; fp8 / fp8_e4m3: e4m3 "
        "with a per-layer scale, about twice the blocks)",
    )
    speculative_config: SpeculativeConfig | None = Field(
        None,
        description="speculative decoding, as JSON: "
        '\'{"method": "ngram", "num_speculative_tokens": 4}\' (methods ngram, suffix, '
        'draft_model with "model": a draft checkpoint, ernie_mtp: the checkpoint\'s own MTP '
        "layer; greedy and sampled outputs keep their distribution; unset: off)",
    )
    device: str = Field("cpu", description="torch device of the workers ('cuda' on GPU nodes)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="shards of attention heads (must divide the kv heads)"
    )
    expert_parallel_size: int | None = Field(
        None, ge=1, description="shards of the experts (unset: the tensor-parallel size)"
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="longest prompt + output (unset: max_position_embeddings of config.json)",
    )
    max_num_seqs: int = Field(32, ge=1, description="most sequences per step")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="token budget of one step, shared by prefill chunks and decodes"
    )
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    num_kv_blocks: int | None = Field(
        None,
        ge=1,
        description="KV cache size in blocks, overriding kv_cache_memory_bytes (unset: from "
        "the memory budget)",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="KV cache budget per rank in bytes, used as given (gpu_memory_utilization "
        "is then ignored; unset: 1 GiB on CPU, on a GPU what gpu_memory_utilization leaves "
        "after the weights and a profiled forward)",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="automatic prefix caching (a prompt reuses the KV of a cached prefix)",
        json_schema_extra={"flags": ["--no-prefix-caching"]},
    )
    kv_offload_gb: float = Field(
        0.0,
        ge=0,
        description="host memory per rank, in GiB, for KV blocks evicted from the device: "
        "prefixes come back by copy instead of recompute (0: off; needs prefix caching; count "
        "it in the pod's memory request; --swap-space is an alias)",
        json_schema_extra={"flags": ["--kv-offload-gb", "--swap-space"]},
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="fraction of each GPU's memory the engine may fill with weights, "
        "activations and KV cache (what other processes hold counts against it); the KV cache "
        "gets what the profiled rest leaves. Not used on CPU",
    )
    attention_backend: AttentionBackend = Field(
        "auto",
        description="paged attention kernels ('auto': triton on CUDA, the torch reference "
        "elsewhere)",
    )
    enforce_eager: bool = Field(
        False,
        description="run every step eagerly, without capturing CUDA graphs (debugging; saves "
        "the graphs' memory)",
    )
    multi_rank_cuda_graphs: bool = Field(
        False,
        description="capture CUDA graphs at tensor-parallel size > 1 too (off: eager there "
        "until a multi-GPU run has matched graphs to eager, benchmarks/device_check.sh)",
    )
    grammar_compile_threads: int = Field(
        2,
        ge=1,
        description="output-constraint (grammar) compiles that run at once, one thread each",
        json_schema_extra=GRAMMAR_GROUP,
    )
    grammar_compile_timeout_s: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,
        description="longest a request waits for its grammar (400 when the compile itself "
        "takes longer, 503 when it could not start in time because the pool is busy)",
        json_schema_extra=GRAMMAR_GROUP,
    )
    grammar_max_pending_compiles: int = Field(
        64,
        ge=1,
        description="compiles waiting for a thread; a new grammar beyond them gets 503",
        json_schema_extra=GRAMMAR_GROUP,
    )
    grammar_cache_bytes: int = Field(
        512 * 2**20,
        ge=0,
        description="byte budget of the compiled-grammar cache (LRU; spec text + compiled size)",
        json_schema_extra=GRAMMAR_GROUP,
    )
    structured_outputs_any_whitespace: bool = Field(
        False,
        description="let constrained JSON (response_format, strict tools, forced tool calls) "
        "hold free whitespace, at most 32 characters in a run (off: compact JSON, "
        'one spelling: {"a": 1, "b": [2, 3]}; vLLM\'s disable_any_whitespace)',
        json_schema_extra=GRAMMAR_GROUP,
    )

    @model_validator(mode="wrap")
    @classmethod
    def _worded(cls, data: Any, handler: Any) -> Any:
        """Field problems as one line each: 'block_size must be >= 1, got 0'."""
        try:
            return handler(data)
        except ValidationError as exc:
            raise ValueError("; ".join(_worded_error(cls, e) for e in exc.errors())) from None

    @model_validator(mode="after")
    def _check_engine_settings(self) -> EngineSettings:
        expert = self.expert_parallel_size or self.tensor_parallel_size
        if expert != self.tensor_parallel_size:
            raise ValueError(
                f"expert_parallel_size ({expert}) must equal "
                f"tensor_parallel_size ({self.tensor_parallel_size}) for now"
            )
        if self.kv_offload_enabled and not self.enable_prefix_caching:
            raise ValueError(
                f"the host KV tier (kv_offload_gb={self.kv_offload_gb}) needs prefix caching: "
                "its blocks are found by hash"
            )
        return self

    @property
    def kv_offload_enabled(self) -> bool:
        return self.kv_offload_gb > 0

    def engine_settings(self) -> dict[str, Any]:
        """The values of the `EngineSettings` fields (what an `EngineConfig` takes from this)."""
        return {name: getattr(self, name) for name in EngineSettings.model_fields}


class EngineConfig(EngineSettings):
    """What one engine runs with: the settings with the model resolved, plus the knobs only
    the Python API sets. Built with keywords: `EngineConfig(model=..., max_num_seqs=8)`."""

    model: str = Field(description="checkpoint directory or Hugging Face repo id")
    num_host_kv_blocks: int | None = Field(
        None, ge=0, description="explicit host KV tier size in blocks; overrides kv_offload_gb"
    )
    seed: int = Field(0, description="seed of the generator used by requests that give none")
    show_progress: bool = True

    @property
    def kv_offload_enabled(self) -> bool:
        if self.num_host_kv_blocks is not None:
            return self.num_host_kv_blocks > 0
        return self.kv_offload_gb > 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    def resolve(self, model_config: ErnieMoeConfig) -> EngineConfig:
        """Fill max_model_len from the checkpoint."""
        max_model_len = max_model_len_for(self.max_model_len, model_config)
        if max_model_len == self.max_model_len:
            return self
        return self.model_copy(update={"max_model_len": max_model_len})

    def num_blocks_cap(self) -> int:
        """Never more blocks than every sequence at full length could use."""
        max_len = self.max_model_len or 0
        return self.max_num_seqs * (-(-max_len // self.block_size)) + 1


def _worded_error(model: type[BaseModel], error: Any) -> str:
    """One pydantic error in the project's words: the setting, what it must be, the value."""
    loc = ".".join(str(part) for part in error["loc"])
    top_level = len(error["loc"]) == 1
    field = model.model_fields.get(str(error["loc"][0])) if top_level else None
    value = error.get("input")
    shown = repr(value) if isinstance(value, str) else value
    kind = error["type"]
    if field is not None and kind in _BOUND_ERRORS:
        return f"{loc} must be {_bounds_text(field)}, got {shown}"
    if field is not None and kind == "literal_error":
        return f"unknown {loc} {shown}; choose one of {_literal_choices(field.annotation)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def _literal_choices(annotation: Any) -> list[Any]:
    """The values of a Literal, or of the Literal inside `Literal[...] | None`."""
    choices: list[Any] = []
    for part in get_args(annotation):
        choices.extend(get_args(part) if get_args(part) else [part])
    return [choice for choice in choices if choice is not type(None)]


_BOUND_ERRORS = (
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "finite_number",
)


def _bounds_text(field: Any) -> str:
    """'>= 1', 'in (0, 1]', 'a finite number > 0' from a field's declared bounds."""
    bounds = {}
    finite = False
    for item in field.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
        finite = finite or getattr(item, "allow_inf_nan", None) is False
    low = next(((name, bounds[name]) for name in ("gt", "ge") if name in bounds), None)
    high = next(((name, bounds[name]) for name in ("lt", "le") if name in bounds), None)
    if low and high:
        opening = "(" if low[0] == "gt" else "["
        closing = ")" if high[0] == "lt" else "]"
        return f"in {opening}{low[1]:g}, {high[1]:g}{closing}"
    name, limit = low or high  # type: ignore[misc]
    symbol = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[name]
    return f"{'a finite number ' if finite else ''}{symbol} {limit:g}"
