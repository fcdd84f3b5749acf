"""Quantization math as pure functions.

Conventions (identical to ONNX ``QuantizeLinear``/``DequantizeLinear`` and TensorRT):

* ``quantize(x) = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)``. The division is done
  in the dtype of ``x`` (float32 in training, float64 in the reference tests), not as a multiply by
  ``1 / scale``, so results match ONNX Runtime bit for bit on the same dtype.
* ``dequantize(q) = (q - zero_point) * scale``.
* ``fake_quantize(x) = dequantize(quantize(x))``; its gradient is the straight-through estimator:
  1 where ``x / scale + zero_point`` rounds inside ``[qmin, qmax]``, 0 where it is clamped.
* The range handed to :func:`choose_qparams` is first widened to contain 0, so 0 is exactly
  representable (zero padding and ReLU outputs stay exact). A degenerate range (min == max == 0)
  gets ``scale = eps`` (float32 machine epsilon) rather than 0.
* Quantized values are returned as ``torch.int32`` tensors whatever the bit width (2..16 bits, signed or
  unsigned, all fit); exporters narrow them to int8/uint8/int16 as the format needs.
* Per-channel: ``scale``/``zero_point`` are 1-D with one entry per index along ``axis``.

fp8 (a :class:`~mixq.spec.FloatType` dtype, e4m3fn) takes the same functions, as ONNX ``QuantizeLinear`` with a
``FLOAT8E4M3FN`` zero point does (saturate=1): ``scale = max(|min|, |max|) / 448`` (the same ``SCALE_EPS`` floor),
zero point 0, ``quantize(x) = cast_e4m3(clamp(x / scale, -448, 448))`` (round to nearest even, a
``torch.float8_e4m3fn`` tensor), so ``fake_quantize(x) = float(cast_e4m3(clamp(x / scale, -448, 448))) * scale``.
The straight-through gradient is 1 where ``|x / scale| <= 448`` and 0 where it saturates.
"""

from __future__ import annotations

import torch

from .spec import FloatType, IntType, QuantSpec

__all__ = [
    "SCALE_EPS",
    "choose_qparams",
    "choose_qparams_from_tensor",
    "tensor_range",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_lsq",
    "fake_quantize_fp8",
    "FP8_TORCH_DTYPE",
    "symmetric_zero_point",
    "channels_first",
    "fold_batchnorm",
]

SCALE_EPS = float(torch.finfo(torch.float32).eps)
FP8_TORCH_DTYPE = torch.float8_e4m3fn  # the torch type of mixq.spec.FP8_E4M3


def tensor_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x``: scalars for per-tensor, 1-D along the spec's channel axis for per-channel."""
    x = x.detach()
    if not spec.per_channel:
        return torch.aminmax(x)  # one pass over the tensor
    return torch.aminmax(channels_first(x, spec.axis), dim=1)


def channels_first(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` as a 2-D ``[channels, everything else]`` view, channels taken along ``axis``."""
    axis = _normalize_axis(axis, x.dim())
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a conv followed by an eval-mode BatchNorm, as one conv (output channels on axis 0).

    ``w' = w * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    The one BN fold of mixq: the QAT wrapper and the export use it, so exported weights match their scales.
    """
    factor = bn_weight / torch.sqrt(running_var + eps)
    shifted = (bias if bias is not None else torch.zeros_like(running_mean)) - running_mean
    return weight * factor.reshape(-1, *([1] * (weight.dim() - 1))), shifted * factor + bn_bias


def choose_qparams(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QuantSpec, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) covering ``[min_val, max_val]`` widened to contain 0.

    ``check`` rejects NaN/infinite ranges and min > max; it reads the values back to the host, so the
    training hot path (ranges it computed itself, on a GPU) turns it off. Exported configs are validated
    again when written.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float64)
    max_val = torch.as_tensor(max_val, dtype=torch.float64)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min and max shapes differ: {tuple(min_val.shape)} vs {tuple(max_val.shape)}")
    if check and not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("cannot choose qparams for a range that is NaN or infinite")
    if check and (min_val > max_val).any():
        raise ValueError("cannot choose qparams: min > max")
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    if spec.is_float:  # symmetric, zero point 0 (QuantSpec allows nothing else for fp8)
        scale = torch.clamp(torch.maximum(-lo, hi) / spec.dtype.max, min=SCALE_EPS)
        return scale.to(torch.float32), torch.zeros(scale.shape, dtype=torch.int32)
    qmin, qmax = spec.dtype.qmin, spec.dtype.qmax
    if spec.symmetric:
        zp_value = symmetric_zero_point(spec.dtype, spec.convention)
        amax = torch.maximum(-lo, hi)
        # NNI's symmetric scale spans half the integer range (127.5 steps for uint8); mixq's, qmax - zero point.
        scale = amax / ((qmax - qmin) / 2 if spec.convention == "nni" else qmax - zp_value)
        zero_point = torch.full_like(scale, zp_value)
    else:
        # The zero point is derived from the float32 scale that will actually be stored.
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=SCALE_EPS).to(torch.float32).to(torch.float64)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    scale = torch.clamp(scale, min=SCALE_EPS)
    return scale.to(torch.float32), zero_point.to(torch.int32)


def choose_qparams_from_tensor(
    x: torch.Tensor, spec: QuantSpec, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_qparams` on the min/max of ``x`` (per channel where the spec says so)."""
    return choose_qparams(*tensor_range(x, spec), spec, check)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: IntType | FloatType,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer values (int32 tensor) of ``x``, or for fp8 its e4m3 values (a ``torch.float8_e4m3fn`` tensor; fp8's
    zero point is always 0 and not read); see the module doc for the exact rounding."""
    s, zp = _broadcast(scale, zero_point, x, axis)
    if isinstance(dtype, FloatType):
        return _to_fp8(x / s.to(x.dtype), dtype)
    q = torch.round(x / s.to(x.dtype)) + zp.to(x.dtype)
    return torch.clamp(q, dtype.qmin, dtype.qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in ``out_dtype``."""
    s, zp = _broadcast(scale, zero_point, q, axis)
    return (q.to(out_dtype) - zp.to(out_dtype)) * s.to(out_dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: IntType | FloatType,
    axis: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the dtype of ``x``, with the straight-through gradient.

    16-bit inputs (autocast) are quantized in float32 and the result rounded back: in bf16, ``x / scale`` could
    not even hold the integers up to 255 exactly. fp8 dtypes go to :func:`fake_quantize_fp8` (zero point 0)."""
    if isinstance(dtype, FloatType):
        return fake_quantize_fp8(x, scale, axis, dtype)
    s, zp = _broadcast(scale, zero_point, x, axis)
    compute = _compute_dtype(x)
    out = _FakeQuantizeSTE.apply(x.to(compute), s.to(compute), zp.to(compute), dtype.qmin, dtype.qmax)
    return out.to(x.dtype)


def fake_quantize_fp8(
    x: torch.Tensor, scale: torch.Tensor, axis: int | None = None, dtype: FloatType | None = None
) -> torch.Tensor:
    """``float(cast_e4m3(clamp(x / scale, -448, 448))) * scale`` in the dtype of ``x`` (16-bit inputs computed in
    float32), with the straight-through gradient: 1 where ``|x / scale| <= 448``, 0 where it saturates."""
    dtype = dtype or FloatType()
    s, _ = _broadcast(scale, None, x, axis)
    compute = _compute_dtype(x)
    x_c = x if x.dtype == compute else x.to(compute)  # no identity cast: an ONNX trace would record one
    return _FakeQuantizeFP8STE.apply(x_c, s.to(compute), dtype).to(x.dtype)


def _to_fp8(v: torch.Tensor, dtype: FloatType) -> torch.Tensor:
    """``v`` (already divided by the scale) saturated to the type's range and rounded to it (nearest, ties to
    even: torch's cast, which would give NaN beyond the range, hence the clamp first)."""
    return torch.clamp(v, -dtype.max, dtype.max).to(FP8_TORCH_DTYPE)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: IntType,
    axis: int | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize with a learnable ``scale`` (LSQ, Esser et al. 2020).

    Same forward values as :func:`fake_quantize`; the gradient flows to ``scale`` (multiplied by
    ``grad_scale``, the paper's ``1 / sqrt(numel * qmax)``) and straight through to ``x`` where not clamped.
    16-bit inputs are computed in float32, as in :func:`fake_quantize`.
    """
    if isinstance(dtype, FloatType):
        raise ValueError("LSQ learns an integer step size; it does not apply to fp8")
    s, zp = _broadcast(scale, zero_point, x, axis)
    compute = _compute_dtype(x)
    x_c, s = x.to(compute), s.to(compute)
    s = s * grad_scale + (s - s * grad_scale).detach()  # value s, gradient scaled by grad_scale
    zp = zp.to(compute)
    v = x_c / s
    v_rounded = v + (torch.round(v) - v).detach()
    q = torch.clamp(v_rounded + zp, dtype.qmin, dtype.qmax)
    return ((q - zp) * s).to(x.dtype)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale) + zero_point
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return (torch.clamp(q, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _FakeQuantizeFP8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, dtype):
        v = x / scale
        ctx.save_for_backward(v.abs() <= dtype.max)
        return _to_fp8(v, dtype).to(x.dtype) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def symmetric_zero_point(dtype: IntType | FloatType, convention: str = "mixq") -> int:
    """The fixed zero point of a symmetric scheme: 0 for signed types and fp8, ``2**(bits-1)`` for unsigned ones;
    NNI's convention takes ``(qmin + qmax) // 2`` (the same 0 for its narrow signed types, 127 for uint8)."""
    if isinstance(dtype, FloatType):
        return 0
    if convention == "nni":
        return (dtype.qmin + dtype.qmax) // 2
    return 0 if dtype.signed else 1 << (dtype.bits - 1)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def _broadcast(scale, zero_point, x, axis):
    """``scale`` and ``zero_point`` shaped to broadcast against ``x``; a zero point of None (fp8's) stays None."""
    scale = torch.as_tensor(scale, device=x.device)
    zp = None if zero_point is None else torch.as_tensor(zero_point, device=x.device)
    if scale.numel() == 1 and axis is None:
        return scale.reshape(()), None if zp is None else zp.reshape(())
    if axis is None:
        raise ValueError(f"per-channel qparams ({scale.numel()} scales) need an axis")
    axis = _normalize_axis(axis, x.dim())
    zp_count = scale.numel() if zp is None else zp.numel()
    if scale.numel() != x.shape[axis] or zp_count != x.shape[axis]:
        raise ValueError(
            f"per-channel qparams have {scale.numel()} scales / {zp_count} zero points but the "
            f"tensor has {x.shape[axis]} channels along axis {axis} (shape {tuple(x.shape)})"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), None if zp is None else zp.reshape(shape)
