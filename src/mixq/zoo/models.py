"""Registered example models: the NNI tutorial's LeNet, a CIFAR ResNet-18, and tiny models for tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import ConfigError
from .coverage import COVERAGE_FAMILIES

__all__ = ["register_model", "create_model", "list_models", "TorchModel", "resnet18_cifar"]

_REGISTRY: dict[str, Callable[[], nn.Module]] = {}


def register_model(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def create_model(name: str) -> nn.Module:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {list_models()}")
    return _REGISTRY[name]()


def list_models() -> list[str]:
    return sorted(_REGISTRY)


class TorchModel(nn.Module):
    """The LeNet of NNI's MNIST tutorial (``nni_assets.compression.mnist_model.TorchModel``), same names."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, 1)
        self.conv2 = nn.Conv2d(6, 16, 5, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.pool1 = nn.MaxPool2d((2, 2))
        self.pool2 = nn.MaxPool2d((2, 2))

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        x = self.fc3(x)
        return F.log_softmax(x, dim=1)


@register_model
def lenet() -> nn.Module:
    return TorchModel()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max pool), as in the NNI CIFAR-10 example."""

    def __init__(self, num_classes: int = 10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for name, layer in zip(self.stage_names, layers, strict=True):
            self.add_module(name, layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18_cifar() -> nn.Module:
    return ResNetCifar()


@register_model
def tiny_resnet() -> nn.Module:
    """Two-stage residual net with BatchNorm, for fast tests of folding and residual structure."""
    return ResNetCifar(widths=(8, 16), blocks=(1, 1))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU6()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


@register_model
def tiny_mlp() -> nn.Module:
    return TinyMLP()


class TinyConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


@register_model
def tiny_conv1d() -> nn.Module:
    return TinyConv1d()


_REGISTRY.update({name: cls for name, (cls, _) in COVERAGE_FAMILIES.items()})  # tiny_vit, tiny_bert, ...
