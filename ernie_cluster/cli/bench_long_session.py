"""`ernie-cluster bench long-session` (registered once written)."""

from __future__ import annotations


def add_long_session_parser(kinds) -> None:
    """Register the subcommand on the `bench` subparsers (nothing yet)."""
