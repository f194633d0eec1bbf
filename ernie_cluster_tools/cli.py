"""The tooling subcommands of `ernie-cluster`: `make-tiny` (a random test checkpoint) and
`train-demo` (the demo model, flags in train_demo.py).

`add_tool_commands` is what the runtime CLI calls to register them. Registering loads neither
torch nor transformers: each handler imports its work when it runs.
"""

from __future__ import annotations

import argparse

from ernie_cluster_tools import train_demo
from ernie_cluster_tools.fixtures.presets import PRESETS


def add_tool_commands(subparsers) -> None:
    """Register `make-tiny`, then `train-demo`, on the `ernie-cluster` subcommand parsers."""
    tiny = subparsers.add_parser("make-tiny", help="write a random checkpoint for tests and demos")
    tiny.add_argument("directory", help="output directory (created)")
    tiny.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tiny.add_argument(
        "--force", action="store_true", help="write into a directory that is not empty"
    )
    tiny.set_defaults(func=run_make_tiny)
    train_demo.add_parser(subparsers)


def run_make_tiny(args: argparse.Namespace) -> int:
    from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(
        args.directory, args.preset, args.seed, args.dtype, force=args.force
    )
    print(f"wrote the {args.preset!r} checkpoint (seed {args.seed}) to {path}")
    return 0
