#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv, then runs every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check ernie_cluster tests benchmarks
.venv/bin/ruff format --check ernie_cluster tests benchmarks
exec .venv/bin/python -m pytest "$@"
