#!/usr/bin/env bash
# The main job: set up, then run the NNI tutorial end to end on MNIST (`mixq demo`). Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MIXQ_DATA=${MIXQ_DATA:-$(cd .. && pwd)/shared/data}
exec .venv/bin/mixq demo "$@"
