#!/usr/bin/env bash
# Creates .venv (once) and installs this package: `bootstrap.sh serve` installs what serving
# needs (the demo), `bootstrap.sh test` (the default) adds the test extra. Idempotent: a
# second run only checks that the installed package still matches pyproject.toml.
#
# torch comes first and pinned: a bare "torch" pulled in by another package would be the
# multi-GB CUDA build. Without an NVIDIA GPU the CPU build is taken from PyTorch's CPU index,
# falling back to the default index where that one is unreachable (as on our CI, whose
# default index serves the CPU build of the pinned version).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-test}
case "$target" in
  serve) extra="" ;;
  test) extra="[test]" ;;
  *) echo "usage: $0 [serve|test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
TORCH="torch==${TORCH_VERSION:-2.13.0}"
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
step() { echo "==> $*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.ernie-cluster-installed-$target
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
  exit 0
fi

step "upgrading pip"
"${PIP[@]}" --quiet --upgrade pip
if .venv/bin/python -c "import torch" 2>/dev/null; then
  step "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  step "installing $TORCH (CUDA build: an NVIDIA GPU is present)"
  "${PIP[@]}" "$TORCH"
else
  step "installing $TORCH (CPU build: no NVIDIA GPU found)"
  if ! "${PIP[@]}" --timeout 15 --retries 1 --index-url https://download.pytorch.org/whl/cpu \
    "$TORCH"; then
    step "PyTorch's CPU index is unreachable: installing $TORCH from the default index"
    "${PIP[@]}" "$TORCH"
  fi
fi
step "installing ernie-cluster${extra} and its dependencies (a few minutes on a fresh machine)"
"${PIP[@]}" -e ".${extra}"
touch "$stamp"
step "environment ready in .venv ($target)"
