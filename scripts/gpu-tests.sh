#!/usr/bin/env bash
# The GPU tests in one command: tests/gpu (marker `gpu`) and the cuda backend's kernel, engine and ahead-of-time
# compile tests run natively, logged with the commit, the GPU and versions, and pytest's summary line.
#   scripts/gpu-tests.sh [LOG] [pytest args...]   (LOG default: gpu-tests-<commit>.log)
# Where the checkout's git metadata is not the tree's own (a copied tree), set MIXQ_COMMIT to the commit tested.
set -uo pipefail
cd "$(dirname "$0")/.."
commit=${MIXQ_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
log=${1:-gpu-tests-${commit:0:7}.log}
shift $(($# > 0 ? 1 : 0))
export PYTHONPATH=${PYTHONPATH:-src}
{
  tree=$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)
  echo "commit: $commit${MIXQ_COMMIT:+ (given by MIXQ_COMMIT)}${tree:+ (tracked files differ from git here)}"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python -c 'import platform, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name} ({p.multi_processor_count} SMs); torch {torch.__version__}; triton {triton.__version__}; python {platform.python_version()}")'
  python -m pytest -rfEs -q -p no:cacheprovider tests/gpu tests/backends/test_cuda_engine.py \
    tests/backends/test_cuda_kernels.py tests/backends/test_cuda_aot.py "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
