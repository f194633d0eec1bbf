"""`ernie-cluster --help` and `ernie-cluster serve --help` load neither torch nor xgrammar nor
transformers: building the parser imports flags and configs only (checked in a fresh
interpreter, since this one has torch loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "xgrammar", "transformers")
TIMEOUT_S = 120

BUILD_AND_PRINT = """
import contextlib, io, json, sys
from ernie_cluster.cli.main import build_parser, main
parser = build_parser()
parser.format_help()
for argv in (["--help"], ["serve", "--help"], ["generate", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as exit_:
            assert exit_.code == 0, (argv, exit_.code)
    assert "usage: ernie-cluster" in out.getvalue(), argv
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)))
""".replace("HEAVY", repr(HEAVY))


def test_building_the_parser_and_printing_help_loads_no_heavy_module():
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_PRINT],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_command_prints_every_serve_flag_with_its_default():
    result = subprocess.run(
        [sys.executable, "-m", "ernie_cluster.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    usage = " ".join(result.stdout.split())
    for flag, default in [
        ("--max-num-seqs", "default 32"),
        ("--grammar-compile-timeout-s", "default 10.0"),
        ("--max-stop-strings", "default 64"),
        ("--graceful-shutdown-timeout-s", "default 300.0"),
    ]:
        assert flag in usage and default in usage.split(flag, 2)[2][:400], flag
    for flag in ("--no-prefix-caching", "--swap-space", "--multi-rank-cuda-graphs", "--port"):
        assert flag in usage
