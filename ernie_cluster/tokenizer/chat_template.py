"""Rendering Hugging Face style Jinja chat templates into prompt text.

Owns the sandboxed Jinja environment (the same helpers transformers gives templates: `tojson`,
`raise_exception`, `strftime_now`, `namespace`) and a cache of compiled templates. It renders
text only; it never tokenizes and never reads template files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["MAX_NESTING", "ChatTemplateError", "render_chat_template"]

MAX_NESTING = 64
"""Deepest nesting of messages, tools and template arguments a render accepts."""


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or called raise_exception()."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any] | Any],
    tools: Sequence[Mapping[str, Any] | Any] | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `template` for a conversation, as transformers' apply_chat_template(tokenize=False).

    Messages are dicts or pydantic models (converted with model_dump()). As in transformers,
    message keys whose value is None are dropped, so `content=None` reads as undefined in the
    template. Extra keyword arguments (bos_token, system_settings, ...) become template variables.
    """
    if not isinstance(template, str) or not template:
        raise ChatTemplateError(f"chat template must be a non-empty string, got {template!r}")
    compiled = _compile(template)
    plain_messages = [_plain_message(message, i) for i, message in enumerate(messages)]
    plain_tools = (
        None
        if tools is None
        else [_plain_data(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    )
    variables = {key: _plain_data(value, key) for key, value in kwargs.items()}
    try:
        return compiled.render(
            messages=plain_messages,
            tools=plain_tools,
            add_generation_prompt=add_generation_prompt,
            # transformers always defines `documents`; templates may test `is defined`.
            **{"documents": None, **variables},
        )
    except ChatTemplateError:
        raise
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
    ) as exc:
        raise ChatTemplateError(
            f"chat template rendering failed: {type(exc).__name__}: {exc}"
        ) from exc


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template does not compile (line {exc.lineno}): {exc.message}"
        ) from exc


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # NOTE: trim_blocks/lstrip_blocks and loopcontrols are what transformers renders with; model
    # templates are written against exactly these settings, so changing them changes prompts.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates need plain json.dumps
    # (non-ASCII kept as is) to match the bytes a model was trained on.
    if isinstance(value, jinja2.Undefined):
        raise ChatTemplateError("tojson got an undefined value (a missing message or tool field?)")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _plain_message(message: Any, index: int) -> dict[str, Any]:
    plain = _plain_data(message, f"messages[{index}]")
    if not isinstance(plain, dict):
        raise ChatTemplateError(
            f"message {index} must be a dict or a pydantic model, got {type(message).__name__}"
        )
    return {key: value for key, value in plain.items() if value is not None}


def _plain_data(value: Any, where: str = "value", depth: int = 0) -> Any:
    """JSON-like data for the template: pydantic models dumped, mappings as dicts, tuples as lists.

    Refuses data nested deeper than MAX_NESTING (a ChatTemplateError naming `where`): no real
    message, tool or template argument nests that deep, and rendering it would recurse past
    Python's limit.
    """
    if depth > MAX_NESTING:
        raise ChatTemplateError(f"{where} is nested deeper than {MAX_NESTING} levels")
    if hasattr(value, "model_dump") and callable(value.model_dump):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {key: _plain_data(item, where, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(item, where, depth + 1) for item in value]
    return value
