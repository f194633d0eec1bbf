"""ServeAppConfig: the one configuration model of a deployment (CLI flags, `serve run`
YAML args and the Helm chart's serveConfigV2 all load through it). The engine settings are
inherited from `EngineSettings`; the serving ones are declared here, and `serve`'s flags are
made from both (cli/serve.py).

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

from ernie_cluster.checkpoints.demo import DEMO_SERVED_NAME
from ernie_cluster.config.engine_config import EngineConfig, EngineSettings
from ernie_cluster.serving.limits import DEFAULT_MAX_BODY_BYTES, RequestLimits
from ernie_cluster.serving.parsers import REASONING_PARSERS, TOOL_PARSERS

API_KEY_ENV = "ERNIE_CLUSTER_API_KEY"
REPLICAS_GROUP = {"group": "replicas (Ray Serve)"}
"""CLI help group of the replica settings (see cli/model_args)."""


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


class ServeAppConfig(EngineSettings):
    """The engine settings (declared once in `EngineSettings`, inherited) and the serving ones."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=False)

    served_model_name: list[str] | None = Field(
        None, description="model names clients send as `model` (unset: the model)"
    )
    reasoning_parser: str | None = Field(
        None,
        description="split reasoning_content from content",
        json_schema_extra={"choices": sorted(REASONING_PARSERS)},
    )
    tool_call_parser: str | None = Field(
        None,
        description="parse <tool_call> blocks into tool_calls",
        json_schema_extra={"choices": sorted(TOOL_PARSERS)},
    )
    api_key: str | None = Field(
        None,
        description="require 'Authorization: Bearer KEY' on the /v1 routes (a key in a config "
        f"or command line leaks, e.g. in `ps`: prefer api_key_file or the {API_KEY_ENV} "
        "environment variable)",
    )
    api_key_file: str | None = Field(
        None, description="read the API key from this file (one line), where the app is built"
    )
    api_key_all_routes: bool = Field(
        False,
        description="require the key on /metrics, /docs, /redoc and /openapi.json too (off: "
        "those and /health are open; /health always is)",
    )
    max_waiting_requests: int | None = Field(
        None, ge=1, description="503 + Retry-After once this many requests wait in a replica"
    )
    max_request_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="Bounds on one request's work (stop strings, constraints, tools, "
        "sequences, header bytes, priority policy); worded 400s beyond them",
    )
    num_replicas: int | None = Field(
        None,
        ge=1,
        description="fixed model replicas (exclusive with autoscaling)",
        json_schema_extra=REPLICAS_GROUP,
    )
    autoscaling: AutoscalingConfig | None = None
    graceful_shutdown_timeout_s: float = Field(
        300.0,
        ge=0,
        description="seconds a model replica being removed (scale-down, redeploy) may keep "
        "finishing its requests before Serve kills it; Ray's own default (20 s) would cut off "
        "long generations",
        json_schema_extra=REPLICAS_GROUP,
    )
    ingress_replicas: int = Field(1, ge=1)
    single_hop: bool = Field(
        False,
        description="run the HTTP app inside the model replicas: one Serve hop (lower latency) "
        "instead of a separate ingress deployment, but replicas are then chosen by load only "
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

    def served_model_names(self) -> list[str]:
        """Names clients use as `model`: `served_model_name`, else the model path or id, else
        the demo checkpoint's name."""
        return self.served_model_name or [self.model or DEMO_SERVED_NAME]

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine of one model replica: these settings, the model resolved to a path."""
        return EngineConfig(**{**self.engine_settings(), "model": model_path}, show_progress=False)
