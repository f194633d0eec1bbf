"""RequestLimits: the operator's bounds on the work one request may ask for, declared once.

Each limit is one pydantic field (name, default, bound, help); the CLI flags (`--max-stop-strings`
…, made by `cli.model_args`), the Serve config's `limits:` block and the HTTP layer's checks all
come from it. The checks
here are the cheap ones (counts and lengths): they run on the event loop before any template is
rendered, any prompt tokenized or any grammar built, so an oversized request costs nothing.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ernie_cluster.serving.errors import BadRequestError

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
"""Largest request body the HTTP gate reads (16 MiB; `max_request_body_bytes` changes it)."""


class RequestLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_stop_strings: int = Field(64, ge=0, description="stop strings one request may give")
    max_stop_chars: int = Field(
        4096, ge=0, description="total characters of a request's stop strings"
    )
    max_choices: int = Field(
        2048,
        ge=1,
        description="alternatives of a guided_choice / structured_outputs.choice, and values "
        "of one enum in a JSON schema",
    )
    max_schema_bytes: int = Field(
        65536,
        ge=256,
        description="size of an output constraint (JSON schema, regex, grammar, structural "
        "tag, choices) and of each tool's parameters schema, as compact JSON",
    )
    max_tools: int = Field(128, ge=0, description="tools one chat request may offer")
    max_prompts: int = Field(256, ge=1, description="prompts one /v1/completions request batches")
    max_sequences: int = Field(
        256,
        ge=1,
        description="sequences one request asks for: n times its prompts (each one runs as a "
        "sequence of its own and counts against admission)",
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="request line plus headers; the one-process server stops reading past it "
        "(Ray Serve's proxy reads them before the app sees them)",
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="'priority' honours a request's `priority` field (lower runs first); "
        "under 'fcfs' a non-zero priority is refused, so clients cannot jump the queue",
    )

    # ----------------------------------------------------------------------- the checks
    def check_stop(self, stop: str | list[str] | None) -> None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > self.max_stop_strings:
            raise BadRequestError(
                f"stop has {len(strings)} strings; this server accepts at most "
                f"{self.max_stop_strings} (--max-stop-strings)",
                param="stop",
            )
        total = sum(len(s) for s in strings)
        if total > self.max_stop_chars:
            raise BadRequestError(
                f"the stop strings have {total} characters in all; this server accepts at most "
                f"{self.max_stop_chars} (--max-stop-chars)",
                param="stop",
            )

    def check_choices(self, choices: list[str] | None, param: str) -> None:
        if choices is not None and len(choices) > self.max_choices:
            raise BadRequestError(
                f"{param} has {len(choices)} alternatives; this server accepts at most "
                f"{self.max_choices} (--max-choices)",
                param=param,
            )

    def check_constraint_size(self, value: Any, param: str) -> None:
        """The size of a constraint as compact JSON (a string counts its characters), and the
        size of every enum inside a schema."""
        if value is None:
            return
        size = len(value) if isinstance(value, str) else len(compact_json(value))
        if size > self.max_schema_bytes:
            raise BadRequestError(
                f"{param} is {size} bytes; this server accepts at most {self.max_schema_bytes} "
                "(--max-schema-bytes)",
                param=param,
            )
        if not isinstance(value, str):
            for enum in enums(value):
                self.check_choices(enum, f"{param} (an enum)")

    def check_tools(self, num_tools: int) -> None:
        if num_tools > self.max_tools:
            raise BadRequestError(
                f"the request offers {num_tools} tools; this server accepts at most "
                f"{self.max_tools} (--max-tools)",
                param="tools",
            )

    def check_sequences(self, num_prompts: int, n: int) -> None:
        if num_prompts > self.max_prompts:
            raise BadRequestError(
                f"a request holds at most {self.max_prompts} prompts, got {num_prompts}; "
                "split the batch (--max-prompts)",
                param="prompt",
            )
        if num_prompts * n > self.max_sequences:
            raise BadRequestError(
                f"the request asks for {num_prompts * n} sequences ({num_prompts} prompts x "
                f"n={n}); this server runs at most {self.max_sequences} per request "
                "(--max-sequences)",
                param="n",
            )

    def check_priority(self, priority: int) -> None:
        if priority != 0 and self.scheduling_policy != "priority":
            raise BadRequestError(
                f"priority {priority} is not honoured: this server schedules first come, first "
                "served (an operator enables priorities with --scheduling-policy priority)",
                param="priority",
            )


def check_request(request, limits: RequestLimits, num_prompts: int = 1) -> None:
    """Every cheap check of a chat or completions request (pydantic has parsed it): counts and
    sizes only, so it runs on the event loop before any expensive planning."""
    limits.check_sequences(num_prompts, request.n)
    limits.check_priority(request.priority)
    limits.check_stop(request.stop)
    limits.check_choices(request.guided_choice, "guided_choice")
    if request.structured_outputs is not None:
        limits.check_choices(request.structured_outputs.choice, "structured_outputs.choice")
    for param, value in constraint_fields(request):
        limits.check_constraint_size(value, param)
    tools = getattr(request, "tools", None) or []
    limits.check_tools(len(tools))
    for i, tool in enumerate(tools):
        limits.check_constraint_size(tool.function.parameters, f"tools[{i}].function.parameters")


def constraint_fields(request) -> list[tuple[str, Any]]:
    """(param, value) of every output constraint a request gives."""
    fields: list[tuple[str, Any]] = [
        ("guided_json", request.guided_json),
        ("guided_regex", request.guided_regex),
        ("guided_choice", request.guided_choice),
        ("guided_grammar", request.guided_grammar),
    ]
    spec = request.response_format.json_schema if request.response_format else None
    if spec is not None:
        fields.append(("response_format.json_schema.schema", spec.schema_))
    structured = request.structured_outputs
    if structured is not None:
        for name in ("json_", "regex", "choice", "grammar", "structural_tag"):
            param = f"structured_outputs.{name.rstrip('_')}"
            fields.append((param, getattr(structured, name)))
    return [(param, value) for param, value in fields if value is not None]


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def enums(value: Any, depth: int = 0):
    """Every `enum` list inside a JSON-schema-like value (bounded depth: the body parser has
    already refused deeper nesting)."""
    if depth > 64:
        return
    if isinstance(value, dict):
        enum = value.get("enum")
        if isinstance(enum, list):
            yield enum
        for item in value.values():
            yield from enums(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from enums(item, depth + 1)
