"""Command-line flags made from pydantic fields: one declaration (name, type, default,
description, bounds) gives the flag, its help and the value handed back to the model, so a
setting of the engine or the Serve config is not written out again for the CLI.

A field's `json_schema_extra` may name its `flags` (aliases, or `--no-x` for a setting that
is on by default), its help `group`, and `choices` checked elsewhere (parser registries).
Validation stays the model's: the flags only parse types.
"""

from __future__ import annotations

import argparse
import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def add_model_args(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    title: str,
    names: list[str] | None = None,
    prefix: str = "",
) -> None:
    """One flag per field in `names` (default: all) in the group `title` (or the field's own
    `group`, joining the parser's group of that title); the value lands in
    `args.<prefix><field name>`."""
    for name in names or list(model.model_fields):
        field = model.model_fields[name]
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        group = argument_group(parser, str(extra.get("group", title)))
        flags = list(extra.get("flags", ["--" + name.replace("_", "-")]))  # type: ignore[arg-type]
        group.add_argument(*flags, dest=prefix + name, **_flag_options(field, extra))


def argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's help group called `title`, made on first use (one section per title)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def model_values(
    args: argparse.Namespace,
    model: type[BaseModel],
    names: list[str] | None = None,
    prefix: str = "",
) -> dict:
    """The fields' values from parsed `args` (as `add_model_args` stored them)."""
    return {name: getattr(args, prefix + name) for name in names or list(model.model_fields)}


def _flag_options(field: FieldInfo, extra: dict[str, Any]) -> dict[str, Any]:
    default = field.get_default(call_default_factory=True)
    description = field.description or ""
    kind = _value_type(field.annotation)
    if kind is bool:
        # NOTE: a setting on by default is turned off by its `--no-...` flag.
        if default:
            return {"action": "store_false", "help": f"turn off: {description}"}
        return {"action": "store_true", "help": description}
    options: dict[str, Any] = {"default": default}
    choices = extra.get("choices")
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        kind = type(choices[0])
    if get_origin(kind) is list:
        options["nargs"] = "+"
        kind = get_args(kind)[0]
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        kind = _json_object  # a nested settings object is given as JSON; the model validates
        options["metavar"] = "JSON"
    options["type"] = kind
    if choices:
        options["choices"] = list(choices)  # type: ignore[call-overload]
    elif kind in (int, float):
        options["metavar"] = "N"
    shown = f" (default {default})" if default is not None else ""
    options["help"] = description + shown
    return options


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _value_type(annotation: Any) -> Any:
    """`int | None` -> int: the type a flag's text is parsed into."""
    if get_origin(annotation) in (Union, types.UnionType):
        (kind,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kind
    return annotation
