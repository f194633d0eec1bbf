"""The ernie-cluster command: make-tiny and offline generate (the README's demo path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ernie_cluster.checkpoints.demo import DEMO_NAME


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ernie_cluster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "make-tiny" in result.stdout and "generate" in result.stdout


def test_generate_on_demo_checkpoint(tmp_path):
    """No --model: the demo checkpoint is made in the cache on first use, then reused."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = run_cli("generate", "--chat", "--prompt", "Hi", "--max-tokens", "5", env=env)
    assert first.returncode == 0, first.stderr
    line = json.loads(first.stdout.strip().splitlines()[-1])
    assert len(line["token_ids"]) >= 1 and line["finish_reason"] in ("stop", "length")
    assert (tmp_path / "ernie-cluster" / DEMO_NAME / "config.json").is_file()
    second = run_cli("generate", "--chat", "--prompt", "Hi", "--max-tokens", "5", env=env)
    assert json.loads(second.stdout.strip().splitlines()[-1]) == line


def test_make_tiny_and_bad_flags(tmp_path):
    result = run_cli("make-tiny", str(tmp_path / "ck"), "--preset", "tiny", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    bad = run_cli("generate", "--model", str(tmp_path / "ck"), "--max-model-len", "0")
    assert bad.returncode == 2 and "max_model_len must be >= 1" in bad.stderr
