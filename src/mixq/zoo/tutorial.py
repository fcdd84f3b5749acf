"""The NNI tutorial's assets (``nni_assets.compression.mnist_model``) on real MNIST: data loaders, the
``trainer`` and ``evaluator`` loops, and the tutorial's ``config_list``. Examples and ``mixq demo`` use these;
the library itself owns no training loop."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..quantization import QAT, prepare_
from .data import load_mnist
from .models import TorchModel

__all__ = [
    "TRAIN_BATCH",
    "TUTORIAL_LR",
    "TUTORIAL_MOMENTUM",
    "TUTORIAL_CONFIG_LIST",
    "ALL_8BIT_CONFIG_LIST",
    "FAST_MIXED_CONFIG_LIST",
    "MnistTask",
    "TrainedVariant",
    "train_variants",
    "evaluator",
    "trainer",
]

TUTORIAL_CONFIG_LIST = [
    {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU"]},
    {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_names": ["fc1", "fc2"]},
]


# The tutorial's loaders and optimizer: train batch 128 shuffled, test batch 1000, SGD lr 0.01 momentum 0.5.
TRAIN_BATCH, TEST_BATCH = 128, 1000
TUTORIAL_LR, TUTORIAL_MOMENTUM = 0.01, 0.5


class MnistTask:
    """MNIST loaders as in the tutorial: train batch ``TRAIN_BATCH`` shuffled, test batch ``TEST_BATCH``."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        train_limit: int | None = None,
        test_limit: int | None = None,
        seed: int = 0,
    ):
        self.train_set = load_mnist(True, data_dir, train_limit)
        self.test_set = load_mnist(False, data_dir, test_limit)
        self.seed = seed

    def train_loader(self, epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return DataLoader(self.train_set, batch_size=TRAIN_BATCH, shuffle=True, generator=g)

    def test_loader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=TEST_BATCH, shuffle=False)


def trainer(model: nn.Module, optimizer, criterion, loader, progress=None) -> float:
    """One epoch; returns the mean training loss."""
    model.train()
    total, n = 0.0, 0
    for data, target in loader:
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(target)
        n += len(target)
        if progress is not None:
            progress.update(1)
    return total / max(n, 1)


@torch.no_grad()
def evaluator(model: nn.Module, loader) -> tuple[float, float]:
    """(mean test loss, accuracy in %) over the whole loader."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for data, target in loader:
        out = model(data)
        loss += float(F.nll_loss(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
        n += len(target)
    return loss / n, 100.0 * correct / n


ALL_8BIT_CONFIG_LIST = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]

# The quantized LeNet config that comes closest to float speed on ONNX Runtime CPU: convs and pools float
# (int8 convs are the slow part), the three Linear layers int8 with 7-bit weights (exact with u8 x s8 kernels
# on CPUs without VNNI). Measured at about the fp32 engine's latency, not clearly faster:
# docs/results/demo-cpu-onnxruntime.md, docs/results/demo-cpu-latency-spread.md,
# benchmarks/results/engines-cpu-603a7af.md.
FAST_MIXED_CONFIG_LIST = [
    {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 7}, "op_types": ["Linear"]},
]


@dataclass
class TrainedVariant:
    name: str
    model: nn.Module
    config_list: list | None  # what QAT trained with; None for the fp32 model
    accuracy: float  # PyTorch (fake-quant) model, full test loader
    epoch_seconds: list[float]


def train_variants(
    task: MnistTask,
    configs: dict,
    epochs: int = 3,
    seed: int = 0,
    progress_factory=None,
    lr: float = TUTORIAL_LR,
    momentum: float = TUTORIAL_MOMENTUM,
) -> dict:
    """Train the tutorial's LeNet from the same initial weights once per entry of ``configs``
    (``{name: config_list}``; ``None`` = plain fp32 training), each for ``epochs`` epochs with SGD (the
    tutorial's lr 0.01 momentum 0.5 unless given), prepared for QAT (the native verbs; what ``QAT_Quantizer``
    does with these configs) where a config is given. A QAT variant's model stays prepared (quantized)."""
    torch.manual_seed(seed)
    init = TorchModel()
    out = {}
    for name, config in configs.items():
        model = copy.deepcopy(init)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        if config is not None:
            prepare_(model, config, QAT(), example_input=torch.rand(32, 1, 28, 28))
        seconds, acc = [], 0.0
        for epoch in range(epochs):
            loader = task.train_loader(epoch)
            bar = (
                progress_factory(total=len(loader), desc=f"{name}: epoch {epoch + 1}/{epochs}")
                if progress_factory
                else None
            )
            start = time.perf_counter()
            trainer(model, optimizer, F.nll_loss, loader, bar)
            seconds.append(time.perf_counter() - start)
            if bar is not None:
                bar.close()
            _, acc = evaluator(model, task.test_loader())
        out[name] = TrainedVariant(name, model.eval(), config, acc, seconds)
    return out
