"""The NNI quantization tutorial's quantization half, with only the imports changed.

MIXQ_DATA=../shared/data python examples/nni_tutorial.py
"""

import os

import torch
import torch.nn.functional as F
from torch.optim import SGD

from mixq.zoo.nni_assets import TorchModel, device, evaluator, trainer  # was: from nni_assets.compression.mnist_model

config_list = [
    {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU"]},
    {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_names": ["fc1", "fc2"]},
]

model = TorchModel().to(device)
optimizer = SGD(model.parameters(), lr=0.01, momentum=0.5)
criterion = F.nll_loss
dummy_input = torch.rand(32, 1, 28, 28).to(device)

from mixq.nni import QAT_Quantizer  # noqa: E402  (was: from nni.compression.pytorch.quantization import ...)

quantizer = QAT_Quantizer(model, config_list, optimizer, dummy_input)
quantizer.compress()
print(model)

for _epoch in range(3):
    trainer(model, optimizer, criterion)
    evaluator(model)

os.makedirs("log", exist_ok=True)
model_path = "./log/mnist_model.pth"
calibration_path = "./log/mnist_calibration.pth"
calibration_config = quantizer.export_model(model_path, calibration_path)

print("calibration_config: ", calibration_config)
