#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs what you asked for.
#   ./dev.sh demo [args]    the main job: python -m lightmotion_fast demo
#   ./dev.sh test [args]    the test suite (pytest)
#   ./dev.sh bench [args]   python -m lightmotion_fast bench
#   ./dev.sh setup          only the set-up
# Set-up: a virtualenv in .venv (LIGHTMOTION_VENV to move it), torch (LIGHTMOTION_TORCH, default
# torch==2.13.0: the CPU wheel on this project's machines; an unpinned torch pulls GBs of CUDA wheels),
# then `pip install --no-build-isolation -e .[test]`, which also builds the C++ extension
# (LIGHTMOTION_NO_EXT=1 skips it). It is redone only when setup.py, pyproject.toml or csrc/ change.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${LIGHTMOTION_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[dev.sh] creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
  fi
  local vpy="$VENV/bin/python" stamp="$VENV/.lightmotion-installed" want
  want=$(cat setup.py pyproject.toml csrc/* | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$vpy" -c "import lightmotion_fast" 2>/dev/null; then
    return
  fi
  echo "[dev.sh] installing build tools and torch"
  "$vpy" -m pip install -q --disable-pip-version-check "setuptools>=69" wheel "ninja>=1.11"
  if ! "$vpy" -c "import torch" 2>/dev/null; then
    "$vpy" -m pip install -q --disable-pip-version-check "${LIGHTMOTION_TORCH:-torch==2.13.0}"
  fi
  echo "[dev.sh] installing lightmotion_fast (editable) and building the C++ extension"
  "$vpy" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
  echo "$want" > "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/python" -m lightmotion_fast demo "$@" ;;
  bench) setup; exec "$VENV/bin/python" -m lightmotion_fast bench "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh demo|test|bench|setup [args]" >&2; exit 2 ;;
esac
