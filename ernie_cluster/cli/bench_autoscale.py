"""`ernie-cluster bench autoscale` (registered once written)."""

from __future__ import annotations


def add_autoscale_parser(kinds) -> None:
    """Register the subcommand on the `bench` subparsers (nothing yet)."""
