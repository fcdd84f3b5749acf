"""Fused fake quantization for eager QAT on a GPU: Triton kernels and their autograd functions.

Imported only when :func:`mixq.quantization.fake_quant.use_fused` says so (a CUDA tensor, eager mode, Triton
installed): ``import mixq`` never imports Triton. Compiled code keeps the plain torch ops, which inductor fuses.

Per quantized tensor, instead of ~30 small torch launches:

* **activation with an EMA observer** (QAT, per tensor): a min/max pass writing per-program partials, one
  single-program kernel that reduces them, takes the EMA step on the observer's own buffers (``min_val``,
  ``max_val``, ``observed``) and chooses scale and zero point in float64 as :func:`~mixq.primitives.choose_qparams`
  does, then one fake-quantize pass writing the output and the straight-through mask (3 launches; the backward
  is one multiply by the mask).
* **weight** (min/max qparams): per channel along axis 0, one launch (one program per channel reads its block
  twice: range and qparams, then fake quantization); per tensor, the three launches above without state.
* **LSQ** (learned scale, per tensor or per channel along axis 0): one launch forward; one backward launch that
  writes the input gradient and per-program partial sums of the scale gradient, which torch adds up.

The arithmetic mirrors the reference ops one by one (IEEE division ``div_rn``, half-to-even rounding, no fused
multiply-add), so values equal the reference bit for bit: the output of :func:`~mixq.primitives.fake_quantize`,
the EMA state of :meth:`~mixq.observers.EMAMinMaxObserver.fold_range`, the LSQ output and input gradient of
:func:`~mixq.primitives.fake_quantize_lsq`. LSQ's scale gradient is a sum over the tensor, added up in another
order than torch's, so it equals the reference up to float32 summation rounding. 16-bit inputs are computed in
float32 and the result rounded to the input dtype, as in :func:`~mixq.primitives.fake_quantize`.

Deferred cross-rank sync (``observer.deferred_sync``) and torch.distributed without it stay fused but hand the
batch's float32 range to ``observer.fold_range`` (which records it, or all-reduces it and takes the EMA step)
instead of taking the EMA step in the kernel.
"""

# ruff: noqa: N803 - Triton style: constexprs upper case
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..distributed import is_distributed
from ..observers import EMAMinMaxObserver
from ..primitives import SCALE_EPS, symmetric_zero_point
from ..spec import QuantSpec

__all__ = [
    "supports_observed",
    "supports_weight",
    "supports_lsq",
    "observe_and_fake_quantize",
    "fake_quantize_weight",
    "fake_quantize_lsq",
]

BLOCK = 4096  # elements per program of the element-wise passes
MAX_PARTIALS = 1024  # programs of the min/max pass (each loops over its share)
WARPS = 8
_NO_FMA = {"enable_fp_fusion": False}  # a*b + c stays two roundings, as in torch's separate ops


# ---------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _round_half_even(v):
    """torch.round: to the nearest integer, ties to even (exact for any float32/float64 below 2**52)."""
    lower = tl.floor(v)
    frac = v - lower
    lower_is_odd = lower - 2.0 * tl.floor(lower * 0.5) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & lower_is_odd), lower + 1.0, lower)


@triton.jit
def _to_dtype_of(y, ptr, BF16: tl.constexpr):
    """``y`` (float32) rounded to nearest-even in the element type of ``ptr``; bf16 through its bits (the same
    rounding as the GPU's conversion, which Triton's CPU interpreter truncates instead)."""
    if BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(ptr.dtype.element_ty)


@triton.jit
def _qparams(lo32, hi32, qmin, qmax, sym_zp, sym_den, eps, SYMMETRIC: tl.constexpr):
    """choose_qparams in float64 for one (min, max): returns the float32 scale and the zero point (float32)."""
    lo = tl.minimum(lo32.to(tl.float64), 0.0)
    hi = tl.maximum(hi32.to(tl.float64), 0.0)
    eps64 = tl.cast(eps, tl.float64)
    if SYMMETRIC:
        scale = tl.maximum(tl.maximum(-lo, hi) / tl.cast(sym_den, tl.float64), eps64)
        zp = tl.cast(sym_zp, tl.float64)
    else:
        scale = tl.maximum((hi - lo) / (tl.cast(qmax, tl.float64) - tl.cast(qmin, tl.float64)), eps64)
        scale = scale.to(tl.float32).to(tl.float64)  # the zero point comes from the float32 scale stored
        qmin64 = tl.cast(qmin, tl.float64)
        zp = tl.minimum(tl.maximum(qmin64 - _round_half_even(lo / scale), qmin64), tl.cast(qmax, tl.float64))
    return tl.maximum(scale, eps64).to(tl.float32), zp.to(tl.float32)


@triton.jit
def _fake_quant(x, s, z, qmin, qmax):
    """primitives._FakeQuantizeSTE's forward in float32: the output and the straight-through mask."""
    q = _round_half_even(tl.div_rn(x, s)) + z
    inside = (q >= qmin) & (q <= qmax)
    return (tl.minimum(tl.maximum(q, qmin), qmax) - z) * s, inside


@triton.jit
def _gated(y, x, inside, gate_ptr, HAS_GATE: tl.constexpr):
    """``where(gate, y, x)``; the straight-through mask is 1 wherever the gate is off."""
    if HAS_GATE:
        on = tl.load(gate_ptr)
        y = tl.where(on != 0, y, x)
        inside = inside | (on == 0)
    return y, inside


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _minmax_partials_kernel(x_ptr, part_ptr, n, n_parts, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p writes the min and max of its elements to part[p] and part[n_parts + p]."""
    pid = tl.program_id(0)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(ITERS):
        offs = (i * n_parts + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(m, x, float("inf")))
        hi = tl.maximum(hi, tl.where(m, x, float("-inf")))
    tl.store(part_ptr + pid, tl.min(lo, axis=0))
    tl.store(part_ptr + n_parts + pid, tl.max(hi, axis=0))


@triton.jit
def _finalize_kernel(
    part_ptr,
    n_parts,
    rng_ptr,
    min_ptr,
    max_ptr,
    observed_ptr,
    qp_ptr,
    decay,
    keep,
    qmin,
    qmax,
    sym_zp,
    sym_den,
    eps,
    EMA: tl.constexpr,
    QPARAMS_FROM_STATE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    P_BLOCK: tl.constexpr,
):
    """One program: the batch range from the partials (to rng), the EMA step on the observer's buffers when EMA
    (apply_global_range's arithmetic: the first batch sets the state), and scale / zero point (to qp) from the
    observer's state when QPARAMS_FROM_STATE, else from the batch range."""
    offs = tl.arange(0, P_BLOCK)
    m = offs < n_parts
    lo = tl.min(tl.load(part_ptr + offs, mask=m, other=float("inf")), axis=0)
    hi = tl.max(tl.load(part_ptr + n_parts + offs, mask=m, other=float("-inf")), axis=0)
    tl.store(rng_ptr, lo)
    tl.store(rng_ptr + 1, hi)
    if EMA:
        first = tl.load(observed_ptr) == 0
        lo = tl.where(first, lo, decay * tl.load(min_ptr) + keep * lo)
        hi = tl.where(first, hi, decay * tl.load(max_ptr) + keep * hi)
        tl.store(min_ptr, lo)
        tl.store(max_ptr, hi)
        tl.store(observed_ptr, tl.full([], 1, tl.uint8))
    elif QPARAMS_FROM_STATE:
        lo = tl.load(min_ptr)
        hi = tl.load(max_ptr)
    scale, zp = _qparams(lo, hi, qmin, qmax, sym_zp, sym_den, eps, SYMMETRIC)
    tl.store(qp_ptr, scale)
    tl.store(qp_ptr + 1, zp)


@triton.jit
def _qparams_from_state_kernel(min_ptr, max_ptr, qp_ptr, qmin, qmax, sym_zp, sym_den, eps, SYMMETRIC: tl.constexpr):
    scale, zp = _qparams(tl.load(min_ptr), tl.load(max_ptr), qmin, qmax, sym_zp, sym_den, eps, SYMMETRIC)
    tl.store(qp_ptr, scale)
    tl.store(qp_ptr + 1, zp)


@triton.jit
def _fake_quant_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    qp_ptr,
    gate_ptr,
    n,
    qmin,
    qmax,
    HAS_GATE: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y, inside = _fake_quant(x, tl.load(qp_ptr), tl.load(qp_ptr + 1), qmin, qmax)
    y, inside = _gated(y, x, inside, gate_ptr, HAS_GATE)
    tl.store(out_ptr + offs, _to_dtype_of(y, out_ptr, BF16), mask=m)
    tl.store(mask_ptr + offs, inside.to(tl.uint8), mask=m)


@triton.jit
def _weight_per_channel_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    qp_ptr,
    K,
    qmin,
    qmax,
    sym_zp,
    sym_den,
    eps,
    SYMMETRIC: tl.constexpr,
    ITERS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per channel: the channel's K elements (one contiguous block) give its range and qparams,
    then are fake-quantized."""
    base = tl.program_id(0).to(tl.int64) * K
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(ITERS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        m = offs < K
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(m, x, float("inf")))
        hi = tl.maximum(hi, tl.where(m, x, float("-inf")))
    s, z = _qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), qmin, qmax, sym_zp, sym_den, eps, SYMMETRIC)
    tl.store(qp_ptr + tl.program_id(0), s)
    tl.store(qp_ptr + tl.num_programs(0) + tl.program_id(0), z)
    for i in range(ITERS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        m = offs < K
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        y, inside = _fake_quant(x, s, z, qmin, qmax)
        tl.store(out_ptr + base + offs, _to_dtype_of(y, out_ptr, BF16), mask=m)
        tl.store(mask_ptr + base + offs, inside.to(tl.uint8), mask=m)


@triton.jit
def _lsq_values(x, s_in, z, gscale, qmin, qmax):
    """fake_quantize_lsq's forward, op by op: the scale with its gradient scaled (value ``s*g + (s - s*g)``),
    ``v = x / s``, the rounded value through the straight-through trick, clamp, dequantize."""
    a = s_in * gscale
    s = a + (s_in - a)
    v = tl.div_rn(x, s)
    qz = (v + (_round_half_even(v) - v)) + z
    inside = (qz >= qmin) & (qz <= qmax)
    q = tl.minimum(tl.maximum(qz, qmin), qmax)
    return (q - z) * s, inside, s, v, q


@triton.jit
def _lsq_forward_kernel(
    x_ptr,
    out_ptr,
    s_ptr,
    zp_ptr,
    gate_ptr,
    K,
    gscale,
    qmin,
    qmax,
    HAS_GATE: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (channels, blocks per channel); per tensor there is one channel of K elements."""
    c = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < K
    ptr_offs = c.to(tl.int64) * K + offs
    x = tl.load(x_ptr + ptr_offs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(zp_ptr + c).to(tl.float32)
    y, inside, _, _, _ = _lsq_values(x, tl.load(s_ptr + c), z, gscale, qmin, qmax)
    y, inside = _gated(y, x, inside, gate_ptr, HAS_GATE)
    tl.store(out_ptr + ptr_offs, _to_dtype_of(y, out_ptr, BF16), mask=m)


@triton.jit
def _lsq_backward_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    s_ptr,
    zp_ptr,
    gate_ptr,
    part_ptr,
    K,
    gscale,
    qmin,
    qmax,
    HAS_GATE: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The input gradient (autograd's ``where(inside, g * s, 0) / s``) and this program's partial sum of the
    scale gradient's terms ``g * (q - zp) - where(inside, g * s, 0) * ((x / s) / s)`` (mul and div backward)."""
    c = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < K
    ptr_offs = c.to(tl.int64) * K + offs
    x = tl.load(x_ptr + ptr_offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + ptr_offs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(zp_ptr + c).to(tl.float32)
    _, inside, s, v, q = _lsq_values(x, tl.load(s_ptr + c), z, gscale, qmin, qmax)
    gv = tl.where(inside, g * s, 0.0)
    gx = tl.div_rn(gv, s)
    term = g * (q - z) + (-gv) * tl.div_rn(v, s)
    if HAS_GATE:
        on = tl.load(gate_ptr) != 0
        gx = tl.where(on, gx, g)
        term = tl.where(on, term, 0.0)
    tl.store(gx_ptr + ptr_offs, _to_dtype_of(gx, gx_ptr, BF16), mask=m)
    tl.store(part_ptr + c * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.where(m, term, 0.0), axis=0))


# ---------------------------------------------------------------------------------------------------------------
# Host side


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its elements fill its storage in some dimension order (contiguous, channels_last), so
    that element-wise kernels can walk the flat storage and ``empty_like`` outputs share the layout."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _channel_blocks(x: torch.Tensor, axis: int | None) -> bool:
    """Per-channel along axis 0 with each channel one contiguous block (contiguous or channels_last weights)."""
    return axis is not None and axis % x.dim() == 0 and x.stride(0) * x.shape[0] == x.numel() and x is _dense(x)


@functools.cache
def _grid_args(spec: QuantSpec) -> dict:
    """qmin, qmax and the symmetric zero point / divisor of choose_qparams (all exact in float32)."""
    qmin, qmax = spec.dtype.qmin, spec.dtype.qmax
    zp = symmetric_zero_point(spec.dtype, spec.convention)
    den = (qmax - qmin) / 2 if spec.convention == "nni" else qmax - zp
    return {"qmin": float(qmin), "qmax": float(qmax), "sym_zp": float(zp), "sym_den": float(den), "eps": SCALE_EPS}


def supports_observed(observer, spec: QuantSpec, x: torch.Tensor) -> bool:
    """The fused activation path: an EMA min/max observer, per tensor, float32 state on the device of ``x``."""
    return (
        isinstance(observer, EMAMinMaxObserver)
        and observer.min_val.device == x.device
        and not spec.per_channel
        and observer.min_val.dtype == torch.float32
        and observer.min_val.shape == ()
    )


def supports_weight(w: torch.Tensor, spec: QuantSpec) -> bool:
    return not spec.per_channel or _channel_blocks(w, spec.axis)


def supports_lsq(x: torch.Tensor, axis: int | None) -> bool:
    return axis is None or _channel_blocks(x, axis)


def _partials(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = x.numel()
    n_parts = min(triton.cdiv(n, BLOCK), MAX_PARTIALS)
    part = torch.empty(2 * n_parts, device=x.device, dtype=torch.float32)
    iters = triton.cdiv(triton.cdiv(n, BLOCK), n_parts)
    _minmax_partials_kernel[(n_parts,)](x, part, n, n_parts, ITERS=iters, BLOCK=BLOCK, num_warps=WARPS)
    return part, n_parts


def _fake_quant_pass(x, qp, gate, spec) -> torch.Tensor:
    out = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8)
    has_gate = isinstance(gate, torch.Tensor)
    g = _gate_bytes(gate) if has_gate else qp
    grid = (triton.cdiv(x.numel(), BLOCK),)
    q = _grid_args(spec)
    _fake_quant_kernel[grid](
        x,
        out,
        mask,
        qp,
        g,
        x.numel(),
        q["qmin"],
        q["qmax"],
        HAS_GATE=has_gate,
        BF16=x.dtype == torch.bfloat16,
        BLOCK=BLOCK,
        num_warps=WARPS,
        **_NO_FMA,
    )
    return _MaskedStraightThrough.apply(x, out, mask)


def _gate_bytes(gate: torch.Tensor) -> torch.Tensor:
    return gate.view(torch.uint8) if gate.dtype == torch.bool else gate.ne(0).view(torch.uint8)


class _MaskedStraightThrough(torch.autograd.Function):
    """Returns the fake-quantized values computed by a kernel; the gradient is ``grad * mask`` (the STE)."""

    @staticmethod
    def forward(ctx, x, out, mask):
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask.view(torch.bool), None, None


def observe_and_fake_quantize(x: torch.Tensor, observer: EMAMinMaxObserver, gate: bool | torch.Tensor) -> torch.Tensor:
    """ActivationQuant's training step, fused: fold the batch range into the observer, then fake-quantize with
    the qparams of the updated range (of the unchanged range with deferred sync, gated by ``ready()``)."""
    spec = observer.spec
    x = _dense(x)
    part, n_parts = _partials(x)
    rng = torch.empty(2, device=x.device, dtype=torch.float32)
    qp = torch.empty(2, device=x.device, dtype=torch.float32)
    fused_ema = not observer.deferred_sync and not is_distributed()
    state = (observer.min_val, observer.max_val, observer.observed.view(torch.uint8))
    _finalize_kernel[(1,)](
        part,
        n_parts,
        rng,
        *state,
        qp,
        observer.decay,
        1 - observer.decay,
        **_grid_args(spec),
        EMA=fused_ema,
        QPARAMS_FROM_STATE=True,
        SYMMETRIC=spec.symmetric,
        P_BLOCK=triton.next_power_of_2(n_parts),
        **_NO_FMA,
    )
    if not fused_ema:
        observer.fold_range(rng[0], rng[1])  # records it (deferred sync) or all-reduces it and takes the EMA step
        if observer.deferred_sync:
            ready = observer.ready()
            gate = ready if gate is True else gate & ready
        else:  # the EMA moved in fold_range: qparams from the new state
            _qparams_from_state_kernel[(1,)](*state[:2], qp, **_grid_args(spec), SYMMETRIC=spec.symmetric, **_NO_FMA)
    return _fake_quant_pass(x, qp, gate, spec)


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec, return_qparams: bool = False):
    """WeightQuant's forward, fused: qparams from the current min/max (per channel along axis 0 or per tensor),
    then fake quantization with the straight-through gradient. ``return_qparams``: also the float32 scale and
    the zero point (float32) the kernel chose, for tests."""
    w = _dense(w)
    if not spec.per_channel:
        part, n_parts = _partials(w)
        rng = torch.empty(2, device=w.device, dtype=torch.float32)
        qp = torch.empty(2, device=w.device, dtype=torch.float32)
        _finalize_kernel[(1,)](
            part,
            n_parts,
            rng,
            rng,
            rng,
            rng,
            qp,
            0.0,
            0.0,
            **_grid_args(spec),
            EMA=False,
            QPARAMS_FROM_STATE=False,
            SYMMETRIC=spec.symmetric,
            P_BLOCK=triton.next_power_of_2(n_parts),
            **_NO_FMA,
        )
        out = _fake_quant_pass(w, qp, True, spec)
    else:
        channels = w.shape[0]
        k = w.numel() // channels
        values = torch.empty_like(w)
        mask = torch.empty_like(w, dtype=torch.uint8)
        qp = torch.empty(2 * channels, device=w.device, dtype=torch.float32)
        block = min(triton.next_power_of_2(k), BLOCK)
        _weight_per_channel_kernel[(channels,)](
            w,
            values,
            mask,
            qp,
            k,
            **_grid_args(spec),
            SYMMETRIC=spec.symmetric,
            ITERS=triton.cdiv(k, block),
            BF16=w.dtype == torch.bfloat16,
            BLOCK=block,
            num_warps=4,
            **_NO_FMA,
        )
        out = _MaskedStraightThrough.apply(w, values, mask)
    if not return_qparams:
        return out
    scale, zp = qp.reshape(2, -1)
    return out, scale, zp


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    axis: int | None,
    grad_scale: float,
    gate: bool | torch.Tensor = True,
) -> torch.Tensor:
    """primitives.fake_quantize_lsq, fused (and gated like ``gated(gate, lsq(x), x)``), computed in float32 and
    returned in the dtype of ``x``; gradients to ``x`` and ``scale``."""
    return _LSQ.apply(_dense(x), scale, zero_point, spec, axis, grad_scale, gate)


def _lsq_launch_shape(x: torch.Tensor, axis: int | None) -> tuple[int, int, int]:
    channels = 1 if axis is None else x.shape[0]
    k = x.numel() // channels
    block = min(triton.next_power_of_2(k), BLOCK)
    return channels, k, block


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, axis, grad_scale, gate):
        channels, k, block = _lsq_launch_shape(x, axis)
        s = scale.detach().float().contiguous().reshape(-1)
        zp = zero_point.reshape(-1).contiguous()
        has_gate = isinstance(gate, torch.Tensor)
        g = _gate_bytes(gate) if has_gate else zp
        out = torch.empty_like(x)
        q = _grid_args(spec)
        grid = (channels, triton.cdiv(k, block))
        _lsq_forward_kernel[grid](
            x,
            out,
            s,
            zp,
            g,
            k,
            float(grad_scale),
            q["qmin"],
            q["qmax"],
            HAS_GATE=has_gate,
            BF16=x.dtype == torch.bfloat16,
            BLOCK=block,
            num_warps=WARPS if block >= 1024 else 4,
            **_NO_FMA,
        )
        ctx.save_for_backward(x, s, zp, g)
        ctx.launch = (channels, k, block, float(grad_scale), q["qmin"], q["qmax"], has_gate, scale.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, s, zp, g = ctx.saved_tensors
        channels, k, block, grad_scale, qmin, qmax, has_gate, scale_shape = ctx.launch
        if grad.stride() != x.stride():
            grad = torch.empty_like(x, dtype=grad.dtype).copy_(grad)
        gx = torch.empty_like(x)
        blocks = triton.cdiv(k, block)
        part = torch.empty(channels * blocks, device=x.device, dtype=torch.float32)
        _lsq_backward_kernel[(channels, blocks)](
            grad,
            x,
            gx,
            s,
            zp,
            g,
            part,
            k,
            grad_scale,
            qmin,
            qmax,
            HAS_GATE=has_gate,
            BF16=x.dtype == torch.bfloat16,
            BLOCK=block,
            num_warps=WARPS if block >= 1024 else 4,
            **_NO_FMA,
        )
        gscale = part.reshape(channels, blocks).sum(dim=1) * grad_scale
        return gx, gscale.reshape(scale_shape), None, None, None, None, None
