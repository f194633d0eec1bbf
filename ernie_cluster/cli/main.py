"""The `ernie-cluster` command line: the table of subcommands (serve, generate, bench, and the
tooling ones make-tiny and train-demo) and the error handling around them. Each subcommand's
flags and handler live in their own module; building the parser imports no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from ernie_cluster.cli.bench import add_bench_parser
from ernie_cluster.cli.generate import add_generate_parser
from ernie_cluster.cli.serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    from ernie_cluster_tools.cli import add_tool_commands

    parser = argparse.ArgumentParser(
        prog="ernie-cluster",
        description="Serve ERNIE-4.5 mixture-of-experts models (OpenAI-compatible, on Ray).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tool_commands(sub)
    add_serve_parser(sub)
    add_generate_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # NOTE: httpx logs every request at INFO: hundreds of lines under bench's progress bar.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValidationError as exc:  # a config's problems, one line each without pydantic's frame
        lines = [error["msg"].removeprefix("Value error, ") for error in exc.errors()]
        print("error: " + "; ".join(lines), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
