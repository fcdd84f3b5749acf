"""Measurements shared by the CLI and the benchmark scripts: average bits, accuracy, latency."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._timing import median_latency
from ..config import WEIGHTED_OP_TYPES

__all__ = ["layer_costs", "average_bits", "accuracy", "median_latency"]


def layer_costs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``{layer: (MACs per sample, parameters)}`` for every Conv1d/Conv2d/Linear, measured with hooks."""
    costs: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        inner = getattr(m, "module", m)  # a mixq QuantWrapper holds the layer as .module
        if type(inner).__name__ not in WEIGHTED_OP_TYPES or name in costs:
            continue

        def hook(mod, inputs, output, name=name, inner=inner):
            per_out = inner.weight[0].numel()  # MACs per output element (Cin/groups * kernel)
            per_sample = output[0].numel() if output.dim() > 1 else output.numel()
            costs[name] = (per_out * per_sample, sum(p.numel() for p in inner.parameters()))

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return costs


def average_bits(costs: dict[str, tuple[int, int]], calibration: dict) -> tuple[float, float]:
    """(MAC-weighted, parameter-weighted) average weight bits over all conv/linear layers: a quantized
    layer counts its ``weight_bits`` (16-bit layers 16), every other layer 32."""

    def bits(name):
        entry = calibration.get(name, {})
        return entry.get("weight_bits", entry.get("input_bits", 32))

    macs = sum(c[0] for c in costs.values())
    params = sum(c[1] for c in costs.values())
    by_mac = sum(c[0] * bits(n) for n, c in costs.items()) / macs
    by_param = sum(c[1] * bits(n) for n, c in costs.items()) / params
    return by_mac, by_param


def accuracy(run: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``run`` over a TensorDataset of (images, labels)."""
    x, y = dataset.tensors
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((run(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(x)
