#!/usr/bin/env bash
# The main job on the built-in demo model (ernie_cluster/checkpoints/demo_checkpoint/): sets up .venv,
# then starts the OpenAI-compatible server (Ray Serve) on http://127.0.0.1:8000/v1 with the
# ERNIE reasoning and tool-call parsers. Extra flags go to `ernie-cluster serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh serve
# NOTE: float32: the demo model's greedy tokens are checked against transformers in float32,
# and at 1.8M parameters float32 costs nothing on a CPU.
exec .venv/bin/ernie-cluster serve --port "${PORT:-8000}" --dtype float32 \
  --reasoning-parser ernie_x1 --tool-call-parser ernie_x1 "$@"
