"""ServeAppConfig: the one configuration model of a deployment (CLI flags, `serve run`
YAML args and the Helm chart's serveConfigV2 all load through it).

The API key may come from the config (`api_key`), a file (`api_key_file`) or the
ERNIE_CLUSTER_API_KEY environment variable (how the Helm chart passes a Kubernetes Secret);
`with_api_key_resolved` reads them at the entry points, so the key never has to be written
into a config file or a command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.serving.limits import RequestLimits
from ernie_cluster.serving.parsers import REASONING_PARSERS, TOOL_PARSERS
from ernie_cluster.serving.settings import DEFAULT_MAX_BODY_BYTES

API_KEY_ENV = "ERNIE_CLUSTER_API_KEY"
GRAMMAR_FIELDS = [
    "grammar_compile_threads",
    "grammar_compile_timeout_s",
    "grammar_max_pending_compiles",
    "grammar_cache_bytes",
]
"""Engine settings of structured outputs, declared once below (CLI flags come from them)."""


def read_api_key_file(path: str | Path) -> str:
    """The key in `path`: its content without surrounding whitespace (a trailing newline)."""
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {str(path)!r}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"the API key file {str(path)!r} is empty")
    if any(char.isspace() for char in key):
        raise ValueError(f"the API key in {str(path)!r} has whitespace inside; one key, one line")
    return key


class AutoscalingConfig(BaseModel):
    """Serve's autoscaling_config of the model deployment. Field names are Ray's
    (ray.serve.config.AutoscalingConfig); None leaves a field out, so Ray's default applies."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest model replicas (0 allows scale to zero)")
    max_replicas: int = Field(1, ge=1, description="Most model replicas")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Requests in flight per replica that autoscaling aims for"
    )
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started on first deploy (None: min_replicas)"
    )
    upscale_delay_s: float | None = Field(
        None, ge=0, description="Seconds load must stay high before adding replicas (None: 30)"
    )
    downscale_delay_s: float | None = Field(
        None, ge=0, description="Seconds load must stay low before removing replicas (None: 600)"
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="Window the load metrics are averaged over (None: 30)"
    )
    metrics_interval_s: float | None = Field(
        None,
        gt=0,
        description="How often replicas report load (None: 10; deprecated in Ray in favour of "
        "RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must be within [min_replicas, max_replicas] "
                f"= [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ServeAppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None,
        description="Checkpoint directory or Hugging Face repo id "
        "(None: the built-in demo checkpoint)",
    )
    revision: str | None = Field(None, description="Hub revision")
    served_model_name: list[str] | None = Field(None, description="Names clients use as `model`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("cpu", description="'cuda' on GPU nodes")
    tensor_parallel_size: int = Field(1, ge=1)
    expert_parallel_size: int | None = Field(
        None, ge=1, description="Default: tensor_parallel_size"
    )
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    kv_offload_gb: float = Field(
        0.0,
        ge=0,
        description="Host KV tier per rank in GiB (0: off): evicted prefixes come back by copy; "
        "count it in the pod's memory request",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of each GPU's memory for weights, activations and KV cache",
    )
    attention_backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="Paged attention kernels ('auto': triton on CUDA, else torch)"
    )
    enforce_eager: bool = Field(False, description="No CUDA-graph capture of decode steps")
    grammar_compile_threads: int = Field(
        EngineConfig.grammar_compile_threads,
        ge=1,
        description="output-constraint (grammar) compiles that run at once, one thread each",
    )
    grammar_compile_timeout_s: float = Field(
        EngineConfig.grammar_compile_timeout_s,
        gt=0,
        allow_inf_nan=False,
        description="longest a request waits for its grammar (400 when the compile itself "
        "takes longer, 503 when it could not start in time)",
    )
    grammar_max_pending_compiles: int = Field(
        EngineConfig.grammar_max_pending_compiles,
        ge=1,
        description="compiles waiting for a thread; a new grammar beyond them gets 503",
    )
    grammar_cache_bytes: int = Field(
        EngineConfig.grammar_cache_bytes,
        ge=0,
        description="byte budget of the compiled-grammar cache (LRU)",
    )
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    api_key: str | None = Field(
        None,
        description="Bearer token required on /v1 routes (prefer api_key_file or the "
        f"{API_KEY_ENV} environment variable: a key in a config or command line leaks)",
    )
    api_key_file: str | None = Field(
        None, description="File holding the API key (read where the app is built)"
    )
    api_key_all_routes: bool = Field(
        False, description="The API key guards /metrics and the API docs too (not /health)"
    )
    max_waiting_requests: int | None = Field(
        None, ge=1, description="Reject with 503 + Retry-After when this many requests wait"
    )
    max_request_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="Bounds on one request's work (stop strings, constraints, tools, "
        "sequences, header bytes, priority policy); worded 400s beyond them",
    )
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replica count (exclusive with autoscaling)"
    )
    autoscaling: AutoscalingConfig | None = None
    graceful_shutdown_timeout_s: float = Field(
        300.0,
        ge=0,
        description="How long a model replica being removed (scale-down, redeploy) may keep "
        "finishing its requests before Serve kills it; Ray's own default (20 s) would cut off "
        "long generations",
    )
    ingress_replicas: int = Field(1, ge=1)
    single_hop: bool = Field(
        False,
        description="Run the HTTP app inside the model replicas (one Serve hop, lower latency) "
        "instead of a separate ingress deployment; replicas are then chosen by load only "
        "(no session affinity)",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per shard worker (CPU mode)")

    @model_validator(mode="after")
    def _check(self) -> ServeAppConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set either api_key or api_key_file, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; leave it unset to serve without a key")
        ep = self.expert_parallel_size or self.tensor_parallel_size
        if ep != self.tensor_parallel_size:
            raise ValueError(
                f"expert_parallel_size ({ep}) must equal tensor_parallel_size "
                f"({self.tensor_parallel_size}) for now"
            )
        for name, value, valid in (
            ("reasoning_parser", self.reasoning_parser, REASONING_PARSERS),
            ("tool_call_parser", self.tool_call_parser, TOOL_PARSERS),
        ):
            if value is not None and value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(valid)}")
        return self

    def with_api_key_resolved(self) -> ServeAppConfig:
        """A copy whose `api_key` is the key to require: `api_key`, else the content of
        `api_key_file`, else $ERNIE_CLUSTER_API_KEY, else None (no key)."""
        key = self.api_key
        if self.api_key_file is not None:
            key = read_api_key_file(self.api_key_file)
        elif key is None:
            key = os.environ.get(API_KEY_ENV, "").strip() or None
        return self.model_copy(update={"api_key": key, "api_key_file": None})

    def engine_config(self, model_path: str) -> EngineConfig:
        return EngineConfig(
            model=model_path,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            tensor_parallel_size=self.tensor_parallel_size,
            expert_parallel_size=self.expert_parallel_size or self.tensor_parallel_size,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_offload_gb=self.kv_offload_gb,
            gpu_memory_utilization=self.gpu_memory_utilization,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            **self.model_dump(include=set(GRAMMAR_FIELDS)),
            show_progress=False,
        )
