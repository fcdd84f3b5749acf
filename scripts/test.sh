#!/usr/bin/env bash
# Set up, lint, and run the whole CPU test suite on the real data in $MIXQ_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MIXQ_DATA=${MIXQ_DATA:-$(cd .. && pwd)/shared/data}
if [ ! -d "$MIXQ_DATA/mnist" ]; then
  echo "error: MIXQ_DATA=$MIXQ_DATA has no mnist/ folder; point MIXQ_DATA at the data (see README)" >&2
  exit 1
fi
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
exec .venv/bin/python -m pytest tests --ignore=tests/gpu "$@"
