#!/usr/bin/env bash
# Every DDP QAT scaling run of docs/distributed.md in one go (one GPU machine with >= 2 GPUs):
#   PYTHONPATH=src bash benchmarks/ddp_scaling_suite.sh OUTDIR
#   SUITE=short ... runs the six runs the first suite lacked; RUN_TIMEOUT=seconds per run (default 200).
# Each line: a name, then benchmarks/ddp_qat_scaling.py's flags; the JSON of each run goes to OUTDIR/NAME.json,
# its log to OUTDIR/NAME.log. Most important runs first (a time limit cuts the tail, not the head).
set -u
out=${1:?usage: ddp_scaling_suite.sh OUTDIR}
mkdir -p "$out"
run() {
    local name=$1 gpus=$2
    shift 2
    echo "== $name: $gpus GPU(s) $*"
    timeout ${RUN_TIMEOUT:-200} torchrun --standalone --nproc_per_node "$gpus" benchmarks/ddp_qat_scaling.py --out "$out/$name.json" "$@" \
        >"$out/$name.log" 2>&1
    echo "   rc=$? $(grep -o "\"images_per_second\": [0-9.]*" "$out/$name.json" 2>/dev/null)"
}
# Every run with one OpenMP thread per process (torchrun sets it for several processes; the 1-GPU runs get the same).
export OMP_NUM_THREADS=1
if [ "${SUITE:-full}" = short ]; then  # the runs that were missing after the first full suite
    run g1_eager 1
    run g2_eager 2
    run g1_amp_compiled_ro 1 --amp --compile reduce-overhead
    run g2_amp_compiled_ro 2 --amp --compile reduce-overhead
    run g1_eager_rep2 1
    run g2_eager_rep2 2
    exit
fi
run g1_eager 1
run g2_eager 2
run g1_eager_rep2 1
run g2_eager_rep2 2
run g2_eager_per_observer 2 --range-sync per-observer
run g1_amp_compiled_ro 1 --amp --compile reduce-overhead
run g2_amp_compiled_ro 2 --amp --compile reduce-overhead
run g2_amp_compiled_ro_grad_bf16 2 --amp --compile reduce-overhead --grad-bf16
run g1_float 1 --float
run g2_float 2 --float
run g1_amp_eager 1 --amp
run g2_amp_eager 2 --amp
run g2_eager_broadcast_buffers 2 --broadcast-buffers
