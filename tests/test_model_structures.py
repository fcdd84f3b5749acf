"""Models with tricky structure: supported, or rejected with a message that names the problem."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq.nni import QAT_Quantizer
from mixq.speedup import ModelSpeedup


class SharedReLU(nn.Module):
    """One ReLU module called twice, an in-place op and a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = self.act(self.fc2(h))
        h += 1.0  # in place
        return self.out(F.relu(h))


def _train(model, shape):
    model.train()
    for _ in range(3):
        model(torch.randn(shape))
    return model.eval()


def test_shared_module_inplace_and_functional_relu_build_and_match():
    torch.manual_seed(0)
    model = SharedReLU()
    config = [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_names": ["act"]},  # one range for both calls
    ]
    QAT_Quantizer(model, config)
    _train(model, (16, 8))
    s = ModelSpeedup(model, (4, 8), backend="onnxruntime").compress()
    x = torch.randn(32, 8)
    with torch.no_grad():
        ref = model(x)
    out, _ = s.inference(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 30


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.fc(x + y)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y, y.sum(1)


def test_multiple_inputs_are_rejected_naming_the_model():
    with pytest.raises(mixq.MixqError, match=r"ONNX export of TwoInputs with input shape \(2, 4\) failed"):
        ModelSpeedup(TwoInputs(), (2, 4), config={}, backend="onnxruntime").compress()


def test_multiple_outputs_are_rejected_clearly():
    with pytest.raises(mixq.backends.EngineError, match="1 inputs and 2 outputs; mixq engines take one input"):
        ModelSpeedup(TwoOutputs(), (2, 4), config={}, backend="onnxruntime").compress()


def test_functional_relu_cannot_be_configured_by_name():
    with pytest.raises(mixq.ConfigError, match="no module named 'relu'"):
        mixq.resolve_config(SharedReLU(), [{"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu"]}])
