"""Command-line flags made from pydantic fields: one declaration (name, type, default,
description) gives the flag, its help and the value handed back to the model, so a setting
of the Serve config is not written out again for the CLI."""

from __future__ import annotations

import argparse
from typing import Literal, get_args, get_origin

from pydantic import BaseModel


def add_model_args(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    title: str,
    names: list[str] | None = None,
    prefix: str = "",
) -> None:
    """One `--flag-name` per field in `names` (default: all); the value lands in
    `args.<prefix><field name>`."""
    group = parser.add_argument_group(title)
    for name in names or list(model.model_fields):
        field = model.model_fields[name]
        annotation = field.annotation
        choices = get_args(annotation) if get_origin(annotation) is Literal else None
        kind = type(choices[0]) if choices else annotation
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=prefix + name,
            type=kind,
            choices=choices,
            metavar=None if choices else "N",
            default=field.get_default(call_default_factory=True),
            help=f"{field.description} (default {field.get_default(call_default_factory=True)})",
        )


def model_values(
    args: argparse.Namespace,
    model: type[BaseModel],
    names: list[str] | None = None,
    prefix: str = "",
) -> dict:
    """The fields' values from parsed `args` (as `add_model_args` stored them)."""
    return {name: getattr(args, prefix + name) for name in names or list(model.model_fields)}
