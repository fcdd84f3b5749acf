"""Layer level: :class:`QuantWrapper` replaces one configured module and owns its tensor quantizers
(input, weight, output) and, when folded, the BatchNorm that follows it. The method objects
(:class:`QAT`, :class:`PTQ`, :class:`LSQ`, :class:`DoReFa`) say how the quantizers learn their ranges."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import ConfigError
from ..config import TWO_INPUT_OP_TYPES, WEIGHTED_OP_TYPES
from ..observers import EMAMinMaxObserver, make_observer
from ..primitives import fold_batchnorm
from ..spec import LayerSpec, QuantSpec
from .fake_quant import (
    ActivationQuant,
    DoReFaWeightQuant,
    Gate,
    LSQActivationQuant,
    LSQWeightQuant,
    WeightQuant,
    gated,
)

__all__ = ["QAT", "PTQ", "LSQ", "DoReFa", "Method", "Mode", "QuantWrapper"]


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training: min/max weights, EMA activation ranges (NNI's QAT_Quantizer)."""

    ema_decay: float = 0.99


@dataclass(frozen=True)
class PTQ:
    """Post-training: observers (chosen per config entry with ``observer``) collect ranges during calibration."""


@dataclass(frozen=True)
class LSQ:
    """Learned step size quantization (Esser et al., 2020) for weights and activations."""


@dataclass(frozen=True)
class DoReFa:
    """DoReFa-Net weight quantization; weights only."""


Method = QAT | PTQ | LSQ | DoReFa


class Mode(enum.Enum):
    CALIBRATE = "calibrate"  # observe activations, compute in float
    QUANTIZE = "quantize"  # fake-quantize as configured


class QuantWrapper(nn.Module):
    """A configured module with fake-quantized input, weight and output (and a folded BatchNorm)."""

    def __init__(self, module: nn.Module, spec: LayerSpec, method: Method, bn: nn.Module | None, bn_name: str | None):
        super().__init__()
        self.module = module
        self.layer_spec = spec
        self.method = method
        self.bn = bn
        self.bn_name = bn_name
        self.mode = Mode.CALIBRATE if isinstance(method, PTQ) else Mode.QUANTIZE
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.input_quantizer = _activation_quant(spec.input, spec, method)
        # A MatMul's second operand: same spec, its own range.
        two_inputs = spec.op_type in TWO_INPUT_OP_TYPES
        self.input1_quantizer = _activation_quant(spec.input, spec, method) if two_inputs else None
        self.output_quantizer = _activation_quant(spec.output, spec, method)
        self.weight_quantizer = _weight_quant(spec.weight, method, module)

    def forward(self, x, *args, **kwargs):
        calibrating = self.mode is Mode.CALIBRATE
        gate = self._gate(calibrating)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x, gate, calibrating)
        if self.input1_quantizer is not None and args:
            args = (self.input1_quantizer(args[0], gate, calibrating), *args[1:])
        if self.layer_spec.op_type in WEIGHTED_OP_TYPES:
            out = self._weighted_forward(x, gate if self.weight_quantizer is not None else False)
        else:
            out = self.module(x, *args, **kwargs)
        if self.output_quantizer is not None:
            out = self.output_quantizer(out, gate, calibrating)
        return out

    def _gate(self, calibrating: bool) -> Gate:
        """Quantize from step ``quant_start_step`` on; the step counter stays on the device (no host sync, no
        Python int that a compiled graph would have to guard on)."""
        if calibrating:
            return False
        start = self.layer_spec.quant_start_step
        gate = True if start <= 0 else self.steps >= start
        if self.training:
            self.steps.add_(1)
        return gate

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with the BatchNorm folded in using its running statistics."""
        w, b = self.module.weight, self.module.bias
        if self.bn is None:
            return w, b
        bn = self.bn
        return fold_batchnorm(w, b, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What an engine should use: folded, and DoReFa-transformed where DoReFa is on."""
        w, b = self.folded_weight_and_bias()
        if self.weight_quantizer is not None:
            w = self.weight_quantizer.deploy_weight(w)
        return w.detach(), None if b is None else b.detach()

    def _bn_factor(self) -> torch.Tensor:
        # running_var needs no gradient, so detach() changes nothing in eager mode; under torch.compile it keeps
        # the backward from reading running_var after the BatchNorm below has updated it in place (seen with
        # torch 2.13: conv gradients 13% off without it; tests/test_qat_compile.py).
        std = torch.sqrt(self.bn.running_var + self.bn.eps).detach()
        return self.bn.weight / std

    def _quantized_weight(self, w: torch.Tensor, gate: Gate) -> torch.Tensor:
        return w if gate is False else gated(gate, self.weight_quantizer(w), w)

    def _weighted_forward(self, x, gate: Gate):
        m = self.module
        if self.bn is None:
            return _apply_weighted(m, x, self._quantized_weight(m.weight, gate), m.bias)
        # BN folding as in Krishnamoorthi 2018 / torch's ConvBn: quantize the weight folded with the running
        # statistics; in training rescale and let the BN normalise with batch statistics.
        sf = self._bn_factor()
        shape = (-1, *([1] * (m.weight.dim() - 1)))
        w = m.weight * sf.reshape(shape)
        y = _apply_weighted(m, x, self._quantized_weight(w, gate), None)
        out_shape = (1, -1, *([1] * (y.dim() - 2)))
        if self.bn.training:
            y = y / sf.reshape(out_shape)
            if m.bias is not None:
                y = y + m.bias.reshape(out_shape)
            return self.bn(y)
        _, bias = self.folded_weight_and_bias()
        return y + bias.reshape(out_shape)

    def extra_repr(self) -> str:
        spec = self.layer_spec
        parts = [f"{t}={spec.spec(t).dtype.name}/{spec.spec(t).scheme}" for t in spec.quant_types]
        if self.bn_name:
            parts.append(f"folded_bn={self.bn_name}")
        return f"{type(self.method).__name__}: " + ", ".join(parts)


def _apply_weighted(m: nn.Module, x, w, b):
    if isinstance(m, nn.Linear):
        return F.linear(x, w, b)
    return m._conv_forward(x, w, b)


def _activation_quant(spec: QuantSpec | None, layer: LayerSpec, method: Method):
    if spec is None:
        return None
    if isinstance(method, LSQ):
        return LSQActivationQuant(spec)
    if isinstance(method, QAT):
        return ActivationQuant(spec, EMAMinMaxObserver(spec, method.ema_decay), observe_in_training=True)
    if isinstance(method, DoReFa):
        raise ConfigError(
            f"layer {layer.name!r}: DoReFa quantizes weights only; remove 'input'/'output' from quant_types"
        )
    return ActivationQuant(spec, make_observer(layer.observer, spec), observe_in_training=False)


def _weight_quant(spec: QuantSpec | None, method: Method, module: nn.Module):
    if spec is None:
        return None
    if isinstance(method, LSQ):
        return LSQWeightQuant(spec, module.weight)
    if isinstance(method, DoReFa):
        return DoReFaWeightQuant(spec)
    return WeightQuant(spec)
