#!/usr/bin/env bash
# Set up, lint, and run the whole CPU test suite on the real data. Data: $MIXQ_DATA if set, else shared/data
# beside the checkout, else ~/.cache/mixq/data, where `mixq download mnist cifar10` puts it (run here when
# missing). The suite runs only with the data found: its data tests would otherwise skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
find_data() {
  .venv/bin/python -c 'import sys; from mixq.zoo.data import data_dir, holds
try:
    d = data_dir(None, "mnist")
except Exception as e:
    sys.exit(str(e))
sys.exit(0 if holds(d, "mnist") and holds(d, "cifar10") and print(d) is None else f"{d} lacks mnist/ or cifar10/")'
}
if ! DATA=$(find_data 2>/dev/null); then
  echo "test.sh: no complete data found; running: .venv/bin/mixq download mnist cifar10" >&2
  .venv/bin/mixq download mnist cifar10 || {
    echo "test.sh: error: no data; set MIXQ_DATA to a folder holding mnist/ and cifar10/, or copy one with" \
      "'mixq download mnist cifar10 --from DIR'" >&2
    exit 2
  }
  DATA=$(find_data)
fi
export MIXQ_DATA=$DATA
echo "test.sh: data from $MIXQ_DATA" >&2
.venv/bin/ruff check src tests benchmarks examples scripts
.venv/bin/ruff format --check src tests benchmarks examples scripts
exec .venv/bin/python -m pytest tests --ignore=tests/gpu "$@"
