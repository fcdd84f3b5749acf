#!/bin/bash
# Run NNI v2.10's example scripts (import lines changed, 1 epoch: see prepare.sh and `diff x.orig x`) with mixq.
# Usage: run_device.sh LOGDIR SCRIPT...   (SCRIPT: quantization/NAME.py, tutorials/NAME.py or test/NAME.py)
# CPU only (CUDA hidden), real torchvision, MNIST from the official gzip files in data/.
cd "$(dirname "$0")"; ROOT=$PWD; LOG=$1; shift; mkdir -p "$LOG"
export CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1 PYTHONPATH=${MIXQ_SRC:-$ROOT/../src} MIXQ_DATA=$ROOT/mixq_data
mkdir -p mixq_data/mnist tutorials/log && cp --update=none data/*.gz mixq_data/mnist/
for d in quantization test; do
  mkdir -p $d/data/MNIST/raw
  for f in data/*.gz; do [ -f $d/data/MNIST/raw/$(basename ${f%.gz}) ] || gunzip -c $f > $d/data/MNIST/raw/$(basename ${f%.gz}); done
done
python3 - <<'PY' >> "$LOG/summary.txt"
import os, platform, sys, torch, onnxruntime, torchvision
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CUDA hidden; python {sys.version.split()[0]}, "
      f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}, threads {torch.get_num_threads()}")
PY
for s in "$@"; do
  dir=$(dirname $s); name=$(basename $s .py); t0=$(date +%s)
  if [ $dir = test ]; then (cd $dir && python3 -m unittest -v $name) > "$LOG/$name.log" 2>&1
  else (cd $dir && python3 $name.py) > "$LOG/$name.log" 2>&1; fi
  echo "$s rc=$? $(( $(date +%s) - t0 ))s" >> "$LOG/summary.txt"
done
cat "$LOG/summary.txt"
