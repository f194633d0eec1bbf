#!/usr/bin/env bash
# The main job on the built-in demo checkpoint: sets up .venv, then starts the OpenAI-compatible
# server (Ray Serve) on http://127.0.0.1:8000/v1. Extra flags go to `ernie-cluster serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh serve
exec .venv/bin/ernie-cluster serve --port "${PORT:-8000}" \
  --reasoning-parser ernie_x1 --tool-call-parser ernie_x1 "$@"
