#!/usr/bin/env bash
# The main job: set up, then run the NNI tutorial end to end on MNIST (`mixq demo`). Extra arguments go to it.
# Data: $MIXQ_DATA if set, else shared/data beside the checkout, else ~/.cache/mixq/data (downloaded there if
# missing; see `mixq download --help` for offline copies).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mixq demo "$@"
