"""Tensor level: one fake-quantization module per quantized tensor (input, weight or output of a layer),
owned by the layer's :class:`~mixq.quantization.wrapper.QuantWrapper`."""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import nn

from .._errors import ConfigError
from ..distributed import all_reduce_mean
from ..observers import Observer
from ..primitives import (
    channels_first,
    choose_qparams,
    choose_qparams_from_tensor,
    fake_quantize,
    fake_quantize_lsq,
    symmetric_zero_point,
)
from ..spec import MAX_BITS, IntType, PerTensor, QuantSpec

__all__ = [
    "Gate",
    "gated",
    "ActivationQuant",
    "LSQActivationQuant",
    "WeightQuant",
    "LSQWeightQuant",
    "DoReFaWeightQuant",
    "use_fused",
    "fused_available",
    "check_integer_method",
]


Gate = bool | torch.Tensor
"""Whether to quantize now: a Python bool, or a device bool tensor (``quant_start_step`` counting, an observer
that may not have seen data) so that the training step never waits for the GPU and never recompiles."""


def fused_available(device_type: str, compiling: bool) -> bool:
    """Whether fake quantization runs as the fused Triton kernels of :mod:`mixq.quantization.fused`: on CUDA, in
    eager mode (a compiled graph keeps the plain torch ops, which inductor fuses itself), with Triton installed."""
    return device_type == "cuda" and not compiling and _triton_installed()


def use_fused(x: torch.Tensor) -> bool:
    """:func:`fused_available` for a tensor about to be fake-quantized, here and now. (The fused kernels compute
    integer grids: fp8 specs never ask, they keep the torch ops of :func:`~mixq.primitives.fake_quantize_fp8`.)"""
    return fused_available(x.device.type, torch.compiler.is_compiling())


def check_integer_method(spec: QuantSpec, method: str, where: str = "") -> None:
    """LSQ and DoReFa learn integer steps: an fp8 spec is an error naming the method (and ``where``: layer, type)."""
    if spec.is_float:
        raise ConfigError(
            f"{where + ': ' if where else ''}{method} learns an integer grid and does not apply to fp8 tensors "
            "(quant_dtype 'fp8'); use QAT or PTQ for fp8"
        )


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fused():
    from . import fused  # imports Triton: only once a CUDA tensor is fake-quantized in eager mode

    return fused


def gated(gate: Gate, quantized: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``quantized`` where the gate is on, ``x`` elsewhere (no branch on device values)."""
    return quantized if gate is True else torch.where(gate, quantized, x)


class ActivationQuant(nn.Module):
    """Fake-quantizes an activation with qparams from an observer.

    ``observe_in_training``: QAT keeps updating the range (EMA) in training mode; PTQ observes only
    while calibrating and then keeps the range fixed.
    """

    def __init__(self, spec: QuantSpec, observer: Observer, observe_in_training: bool):
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.observe_in_training = observe_in_training

    def forward(self, x: torch.Tensor, gate: Gate, calibrating: bool) -> torch.Tensor:
        observing = calibrating or (self.training and self.observe_in_training)
        if observing and not calibrating and gate is not False and not self.spec.is_float and use_fused(x):
            fused = _fused()
            if fused.supports_observed(self.observer, self.spec, x):
                return fused.observe_and_fake_quantize(x, self.observer, gate)
        if observing:
            self.observer.observe(x)
        if calibrating or gate is False:
            return x
        # Without data yet (eval first), or while the batch just observed reaches the range only at the next
        # cross-rank sync (distributed QAT, mixq.distributed), quantize only once there is a range.
        if not observing or self.observer.deferred_sync:
            ready = self.observer.ready()
            if ready is False:
                return x
            gate = ready if gate is True else gate & ready
        scale, zp = choose_qparams(*self.observer.range(), self.spec, check=False)  # no host sync
        return gated(gate, fake_quantize(x, scale, zp, self.spec.dtype), x)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.observer.qparams()

    def tracked_range(self) -> tuple[float, float]:
        lo, hi = self.observer.range()
        return float(lo), float(hi)

    @property
    def initialized(self) -> bool:
        return self.observer.initialized


class LSQActivationQuant(nn.Module):
    """LSQ: a learned per-tensor step size, initialised as ``2 * mean(|x|) / sqrt(qmax)`` on the first batch.

    The zero point is fixed: the spec's symmetric zero point, or ``qmin`` for affine specs (a range
    starting at 0, for non-negative activations such as ReLU outputs).
    """

    def __init__(self, spec: QuantSpec):
        super().__init__()
        check_integer_method(spec, "LSQ")
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.tensor(_lsq_zero_point(spec), dtype=torch.int32))
        self.register_buffer("_initialized", torch.tensor(False))
        self._initialized_host = False  # mirror of the buffer: forward needs no device sync

    @property
    def initialized(self) -> bool:
        return self._initialized_host

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized_host = bool(self._initialized)

    def forward(self, x: torch.Tensor, gate: Gate, calibrating: bool) -> torch.Tensor:
        if not self._initialized_host:  # once, on the first batch
            with torch.no_grad():
                # Every rank starts from the same step size: DDP does not re-broadcast parameters after wrapping.
                self.scale.copy_(all_reduce_mean(_lsq_init_scale(x, self.spec)))
                self._initialized.fill_(True)
            self._initialized_host = True
        if gate is False or calibrating:
            return x
        grad_scale = 1.0 / math.sqrt(x.numel() * _positive_qmax(self.spec))
        scale = self.scale.abs().clamp(min=1e-8)
        if use_fused(x):
            return _fused().fake_quantize_lsq(x, scale, self.zero_point, self.spec, None, grad_scale, gate)
        out = fake_quantize_lsq(x, scale, self.zero_point, self.spec.dtype, None, grad_scale)
        return gated(gate, out, x)

    def qparams(self):
        return self.scale.detach().abs().clamp(min=1e-8).float().cpu(), self.zero_point.cpu()

    def tracked_range(self) -> tuple[float, float]:
        scale, zp = self.qparams()
        return float((self.spec.dtype.qmin - zp) * scale), float((self.spec.dtype.qmax - zp) * scale)


class WeightQuant(nn.Module):
    """Fake-quantizes a weight with qparams from its current min/max (per channel where the spec says so)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.spec.is_float and use_fused(w) and _fused().supports_weight(w, self.spec):
            return _fused().fake_quantize_weight(w, self.spec)
        scale, zp = choose_qparams_from_tensor(w, self.spec, check=False)  # no host sync in the training loop
        return fake_quantize(w, scale.to(w.device), zp.to(w.device), self.spec.dtype, self.spec.axis)

    def deploy_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def qparams(self, w: torch.Tensor):
        return choose_qparams_from_tensor(w, self.spec)

    def export_spec(self) -> QuantSpec:
        """The spec an engine stores the weight with (the configured one)."""
        return self.spec


class LSQWeightQuant(nn.Module):
    """LSQ for weights: learned step size per tensor or per output channel."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor):
        super().__init__()
        check_integer_method(spec, "LSQ")
        self.spec = spec
        channels = weight.shape[spec.axis] if spec.per_channel else 1
        init = _lsq_init_scale(weight, spec)
        self.scale = nn.Parameter(init.reshape(channels) if spec.per_channel else init.reshape(()))
        self.register_buffer("zero_point", torch.full(self.scale.shape, _lsq_zero_point(spec), dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        per_channel_numel = w.numel() // max(1, self.scale.numel())
        grad_scale = 1.0 / math.sqrt(per_channel_numel * _positive_qmax(self.spec))
        scale = self.scale.abs().clamp(min=1e-8)
        if use_fused(w) and _fused().supports_lsq(w, self.spec.axis):
            return _fused().fake_quantize_lsq(w, scale, self.zero_point, self.spec, self.spec.axis, grad_scale)
        return fake_quantize_lsq(w, scale, self.zero_point, self.spec.dtype, self.spec.axis, grad_scale)

    def deploy_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def qparams(self, w: torch.Tensor):
        return self.scale.detach().abs().clamp(min=1e-8).float().cpu(), self.zero_point.cpu()

    def export_spec(self) -> QuantSpec:
        return self.spec


class DoReFaWeightQuant(nn.Module):
    """DoReFa-Net weights: ``2 * round_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` with k = spec bits.

    DoReFa's grid ``{2i / (2^k - 1) - 1}`` has a half-integer zero point on a k-bit grid, but times
    ``2^k - 1`` its levels are the odd integers ``2i - (2^k - 1)``, which a signed (k+1)-bit integer holds
    exactly. So the weight is exported with scale ``1 / (2^k - 1)``, zero point 0 and k+1 bits: the engine
    computes with exactly the trained levels (a k-bit re-quantization would merge some of them). For k = 8
    (nine bits, more than an engine's 8-bit weights) the weight is re-quantized on its 8-bit spec instead.
    """

    def __init__(self, spec: QuantSpec):
        super().__init__()
        check_integer_method(spec, "DoReFa")
        if spec.dtype.bits >= MAX_BITS:
            raise ConfigError(
                f"DoReFa weights are exported exactly on a (bits + 1)-bit grid; use at most {MAX_BITS - 1} bits, "
                f"got {spec.dtype.bits}"
            )
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels = (1 << self.spec.dtype.bits) - 1
        t = torch.tanh(w)
        t = t / (2 * t.abs().max().clamp(min=1e-12)) + 0.5
        scaled = t * levels
        q = scaled + (torch.round(scaled) - scaled).detach()
        return 2 * q / levels - 1

    def deploy_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.forward(w).detach()

    def qparams(self, w: torch.Tensor):
        if not self._exact:
            return choose_qparams_from_tensor(self.deploy_weight(w), self.spec)
        levels = (1 << self.spec.dtype.bits) - 1
        return torch.tensor(1.0 / levels, dtype=torch.float32), torch.tensor(0, dtype=torch.int32)

    def export_spec(self) -> QuantSpec:
        if not self._exact:
            return self.spec
        return QuantSpec(IntType(self.spec.dtype.bits + 1, signed=True), symmetric=True, granularity=PerTensor())

    @property
    def _exact(self) -> bool:
        # Engines hold at most 8-bit weights: 8-bit DoReFa (9 bits exactly) is re-quantized to its 8-bit spec,
        # which merges some of its 256 levels (at most half a step of error).
        return self.spec.dtype.bits + 1 <= 8


def _positive_qmax(spec: QuantSpec) -> int:
    return spec.dtype.qmax - _lsq_zero_point(spec)


def _lsq_zero_point(spec: QuantSpec) -> int:
    return symmetric_zero_point(spec.dtype) if spec.symmetric else spec.dtype.qmin


def _lsq_init_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    x = x.detach().float()
    mean_abs = channels_first(x.abs(), spec.axis).mean(dim=1) if spec.per_channel else x.abs().mean()
    return (2 * mean_abs / math.sqrt(_positive_qmax(spec))).clamp(min=1e-8)
