#!/bin/bash
# Turn NNI v2.10's example scripts (*.orig, from microsoft/nni) into mixq runs: only the import lines change,
# plus 1 epoch and, where NNI hard-codes CUDA, the CPU. `diff x.orig x` shows every change.
set -e
cd "$(dirname "$0")"
imports='s#^from nni.algorithms.compression.pytorch.quantization import#from mixq.nni import#;
s#^from nni.compression.pytorch.quantization.settings import set_quant_scheme_dtype#from mixq.nni import set_quant_scheme_dtype#;
s#^from nni.compression.pytorch.quantization_speedup import ModelSpeedupTensorRT#from mixq.nni import ModelSpeedup as ModelSpeedupTensorRT#;
s#^\( *\)from nni.algorithms.compression.pytorch.quantization import#\1from mixq.nni import#;
s#^\( *\)from nni.compression.pytorch.quantization_speedup import ModelSpeedupTensorRT#\1from mixq.nni import ModelSpeedup as ModelSpeedupTensorRT#;
s#^from nni_assets.compression.mnist_model import#from mixq.zoo.nni_assets import#'
one_epoch='s#for epoch in range([0-9]*):#for epoch in range(1):#'
for f in quantization/*.orig tutorials/*.orig test/*.orig; do
  sed -e "$imports" -e "$one_epoch" "$f" > "${f%.orig}"
done
sed -i 's#device = torch.device("cuda")$#device = torch.device("cuda" if torch.cuda.is_available() else "cpu")#' quantization/QAT_torch_quantizer.py
