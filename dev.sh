#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs what you asked for.
#   ./dev.sh demo [args]    the main job: python -m lightmotion_fast demo
#   ./dev.sh test [args]    the test suite (pytest)
#   ./dev.sh bench [args]   python -m lightmotion_fast bench (results: --out DIR, default
#                           ~/.cache/lightmotion_fast/bench; committed ones live in benchmarks/results/)
#   ./dev.sh gpu [args]     on a CUDA machine: all the GPU evidence in one call (<= 10 min) into gpu_report/
#                           (--dry-run prints the phases, budgets and commands; see lightmotion_fast/bench/gpu.py).
#                           Uses the machine's own python3 (torch, triton): no virtualenv, no set-up.
#   ./dev.sh wheels         download into .whl/ the wheels the GPU machines lack (carry .whl with the tree)
#   ./dev.sh test36 [args]  pytest with Triton 3.6 (the GPU machines' version) first on the path
#   ./dev.sh setup          only the set-up
# Set-up: a virtualenv in .venv (LIGHTMOTION_VENV to move it), torch (LIGHTMOTION_TORCH, default
# torch==2.13.0: the CPU wheel on this project's machines; an unpinned torch pulls GBs of CUDA wheels),
# then `pip install --no-build-isolation -e .[test]`, which also builds the C++ extension
# (LIGHTMOTION_NO_EXT=1 skips it). It is redone only when setup.py, pyproject.toml, build_backend/ or csrc/
# change.
# Set-up also puts a copy of Triton 3.6 (the GPU machines' version) in $VENV/triton-3.6, once, for
# tests/test_triton36_compile.py, which compiles every kernel for sm_90 with it.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${LIGHTMOTION_VENV:-.venv}
PY=${PYTHON:-python3}
TRITON36=3.6.0

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[dev.sh] creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
  fi
  local vpy="$VENV/bin/python" stamp="$VENV/.lightmotion-installed" want
  want=$(cat setup.py pyproject.toml build_backend/*.py csrc/* | sha256sum | cut -d' ' -f1)
  if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$vpy" -c "import lightmotion_fast" 2>/dev/null; then
    echo "[dev.sh] installing build tools and torch"
    "$vpy" -m pip install -q --disable-pip-version-check "setuptools>=69" wheel "ninja>=1.11"
    if ! "$vpy" -c "import torch" 2>/dev/null; then
      "$vpy" -m pip install -q --disable-pip-version-check "${LIGHTMOTION_TORCH:-torch==2.13.0}"
    fi
    echo "[dev.sh] installing lightmotion_fast (editable) and building the C++ extension"
    "$vpy" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
    echo "$want" > "$stamp"
  fi
  triton36
}

# Triton 3.6 beside the venv's own Triton (never replacing it): a --target copy, put first on
# PYTHONPATH only by the commands that want it.
triton36() {
  local dir="$VENV/triton-$TRITON36"
  if [ ! -f "$dir/.complete" ]; then
    echo "[dev.sh] installing triton==$TRITON36 into $dir (the GPU machines' Triton, for the sm_90 compile check)"
    rm -rf "$dir"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$dir" "triton==$TRITON36"
    touch "$dir/.complete"
  fi
}

# The interpreter of Triton 3.6 converts 1-element arrays with int(), which NumPy >= 2.4 refuses:
# kernel tests under 3.6 run with the NumPy of its time beside it.
numpy_for_triton36() {
  local dir="$VENV/numpy-for-triton-$TRITON36"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$dir" "numpy>=2.0,<2.4"
    touch "$dir/.complete"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/python" -m lightmotion_fast demo "$@" ;;
  bench) setup; exec "$VENV/bin/python" -m lightmotion_fast bench "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  test36)
    setup; numpy_for_triton36
    export PYTHONPATH="$VENV/triton-$TRITON36:$VENV/numpy-for-triton-$TRITON36${PYTHONPATH:+:$PYTHONPATH}"
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.triton/cache-$TRITON36}"
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  gpu)   PYTHONUNBUFFERED=1 exec "$PY" lightmotion_fast/bench/gpu.py "$@" ;;
  wheels) setup; exec "$VENV/bin/python" lightmotion_fast/bench/gpu.py --wheels ;;
  *) echo "usage: ./dev.sh demo|test|bench|gpu|wheels|test36|setup [args]" >&2; exit 2 ;;
esac
