"""The two models every NNI compatibility test runs on (a LeNet and a small BN/residual net from
mixq.zoo.models), NNI-style config_lists for each, and a few-step QAT loop on random data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixq.zoo.models import TorchModel, create_model

MODELS = ["lenet", "tiny_resnet"]
SHAPES = {"lenet": (1, 28, 28), "tiny_resnet": (3, 32, 32)}

# Written from NNI's documented config_list keys: conv/linear inputs and weights, ReLU outputs.
CONFIG_LISTS = {
    "lenet": [
        {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_types": ["Conv2d"]},
        {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU"]},
        {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_names": ["fc1", "fc2"]},
    ],
    "tiny_resnet": [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ],
}
# NNI's bits-only speedup config (8 int8, 16 fp16, 32 float per layer).
BITS_CONFIGS = {
    "lenet": {
        "conv1": {"weight_bits": 8, "output_bits": 8},
        "conv2": {"weight_bits": 32, "output_bits": 32},
        "fc1": {"weight_bits": 16, "output_bits": 16},
        "fc2": {"weight_bits": 8, "output_bits": 8},
        "relu4": {"weight_bits": 8, "output_bits": 8},
    },
    "tiny_resnet": {
        "conv1": {"weight_bits": 8, "output_bits": 8},
        "layer1.0.conv1": {"weight_bits": 8, "output_bits": 8},
        "layer1.0.relu1": {"weight_bits": 8, "output_bits": 8},
        "layer2.0.conv1": {"weight_bits": 16, "output_bits": 16},
        "layer2.0.conv2": {"weight_bits": 32, "output_bits": 32},
        "fc": {"weight_bits": 8, "output_bits": 8},
    },
}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TorchModel() if name == "lenet" else create_model(name)


def batch(name: str, n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPES[name], generator=g)


def loader(name: str, batches: int = 4, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, label) pairs, as a DataLoader yields them."""
    return [(batch(name, n, seed=10 + i), torch.randint(0, 10, (n,))) for i in range(batches)]


def train_steps(model: nn.Module, name: str, optimizer=None, steps: int = 3) -> nn.Module:
    """A few training steps on random data (ranges and weights move; accuracy is not the point)."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    model.train()
    for x, y in loader(name, steps):
        optimizer.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        optimizer.step()
    return model.eval()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp(min=1e-20)))
