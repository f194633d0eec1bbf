#!/usr/bin/env bash
# The main job on the built-in demo checkpoint: sets up .venv, then generates offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/ernie-cluster generate --chat --prompt "Hello, ERNIE!" --max-tokens 32 --temperature 0.8 --seed 0 "$@"
