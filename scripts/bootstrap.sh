#!/usr/bin/env bash
# Creates .venv (once) and installs this package with its test extra. Idempotent: a second run
# only checks that the installed package still matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ernie-cluster-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # NOTE: torch first and pinned: a bare "torch" from another requirement would pull a
  # multi-GB CUDA build; 2.13.0 is the CPU build this machine carries.
  .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
