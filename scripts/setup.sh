#!/usr/bin/env sh
# Create ./.venv with streamconv and its test tools. Idempotent; safe to rerun.
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import streamconv, torch, pytest, hypothesis, yaml, google.protobuf" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[test]"
fi
