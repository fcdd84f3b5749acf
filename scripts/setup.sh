#!/usr/bin/env bash
# Create .venv and install mixq with its test tools. torch is pinned to the CPU build 2.13.0 so that pip
# does not pull a multi-GB CUDA build; everything else comes from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
