"""Triton kernels of the ``cuda`` backend (imported only when a CUDA engine is built, loaded or tested).

One implicit-GEMM kernel runs every conv and linear layer (a linear layer is a 1x1 conv on a 1x1 image):
rows are output pixels (batch x OH x OW), columns output channels, the reduction runs over KH x KW x Cin.
Activations are int8, channels-last (NHWC), in a *stored* form where every 8-bit grid spans [-128, 127]
(uint8 values are stored minus 128, their zero point too), so one signed tensor-core path serves both; or
fp8 e4m3 (``torch.float8_e4m3fn``, NHWC), value = stored * scale, no zero point.

Dot modes: int8 x int8 -> int32 (exact); int8 layers also as centred int8 values (x - zp, exact in fp16) on
the fp16 tensor cores with fp32 accumulation (exact while partial sums stay below 2**24, as in the fp32
fake-quant reference; Triton 3.6 pipelines fp16 wgmma but not int8 wgmma), or on the CUDA cores for small
reductions (exact: at most 518 terms); fp16 x fp16 -> fp32, fp32 x fp32 -> fp32 (IEEE), e4m3 x e4m3 -> fp32
(fp8 layers: A straight from the e4m3 NHWC tensor, no conversion, so both operands reach the wgmma from
shared memory K-major and Triton 3.6 pipelines it, which it does not for int8 wgmma; padding read as 0.0 is
exact: fp8 grids have no zero point). The A operand is read either from an 8-bit NHWC tensor or from a float
tensor with any strides (the network's NCHW input), converted on load (quantized on load in int8 and fp8
mode), so no separate quantize pass runs. The epilogue, all in fp32 per element::

    y = (acc - zx * wsum[c]) * scale[c] + bias[c]      (int8: the zero-point correction is exact in int32)
      [+ (acc2 - zx2 * wsum2[c]) * scale2[c]]           (a second GEMM: the 1x1 shortcut conv of a block)
    [y = fake_quant(y, grid0)]                          (the conv output quantized, then float ops)
    [y += residual]                                     (int8 or e4m3 on its grid, or float)
    [y = clamp(y, lo, hi)]                              (ReLU, ReLU6)
    q1 = quant(y, grid1) -> store;  [q2 = quant(dequant(q1, grid1), grid2) -> store]
    or store y (fp16/fp32)

where fp8 (e4m3) grids quantize as ``(y * (1/s))`` clamped to +-448 and converted by the hardware (round to
nearest even), and (fp8 layers) ``scale[c] = s_x * s_w[c]``.

``wsum`` is the weight sum over the kernel taps inside the image for the pixel (padding is read as 0, not as
the zero point: a table per border pattern, see ``cuda.border_table``); ``quant`` multiplies by the
reciprocal of the grid's scale and rounds half to even with one fp32 add (:func:`_quant_inv`). Both were
the epilogue's largest costs when done per element with selects and an IEEE division (gpu-notes.md, note 5).

Loop bounds are compile-time constants (shapes are specialized per layer), which also lets the kernels run
under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU for the tests.
"""

# ruff: noqa: N803, N806, SIM108 - Triton style: constexprs upper case, constexpr branches as if/else blocks
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from ...spec import FP8_E4M3

__all__ = [
    "KernelConfig",
    "DOT_INT8",
    "DOT_FP16",
    "DOT_FP32",
    "DOT_FP8",
    "DOT_FP8_ACC32",
    "DOT_I8F16",
    "DOT_FMA",
    "conv_kernel",
    "pool_kernel",
    "requant_kernel",
    "quantize_kernel",
    "FP8_MAX",
]

DOT_INT8, DOT_FP16, DOT_FP32, DOT_FP8, DOT_I8F16, DOT_FMA = 0, 1, 2, 3, 4, 5
# e4m3 with fp32 accumulation: each BK-long chunk's wgmma result is added to an fp32 accumulator in registers
# (Triton's max_num_imprecise_acc = BK). DOT_FP8 accumulates the whole reduction in the tensor cores' reduced
# precision (about 11 mantissa bits measured on an H100: benchmarks/results/fp8-accumulation-h100.log).
DOT_FP8_ACC32 = 6
FP8_MAX = float(FP8_E4M3.max)  # largest finite e4m3 value


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one conv/GEMM kernel (chosen per layer shape at build time)."""

    bm: int
    bn: int
    bk: int
    warps: int = 4
    stages: int = 3
    math: str = "int8"  # int8 layers: int8 tensor cores | f16 (int8 values on fp16 tensor cores) | fma (CUDA cores);
    # fp8 layers: acc32 (fp32 accumulation across BK chunks) | int8 (the name kept by older engine files: the
    # tensor cores' reduced-precision accumulation over the whole reduction)
    persist: int = 0  # 0: one output tile per program; p > 0: p programs per SM, each looping over tiles

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> KernelConfig:
        return KernelConfig(
            int(d["bm"]),
            int(d["bn"]),
            int(d["bk"]),
            int(d["warps"]),
            int(d["stages"]),
            str(d.get("math", "int8")),
            int(d.get("persist", 0)),
        )

    def __str__(self) -> str:
        return (
            f"{self.bm}x{self.bn}x{self.bk}/w{self.warps}s{self.stages}"
            + ("" if self.math == "int8" else f"/{self.math}")
            + (f"/p{self.persist}" if self.persist else "")
        )


F8_MAX = tl.constexpr(FP8_MAX)
RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: v + this rounds v to an integer, half to even, in one fp32 add


@triton.jit
def _rint(v):
    """Round half to even (as torch.round and ONNX QuantizeLinear), exact for |v| < 2**22; larger values stay
    large and of the same sign (every caller clamps to [-128, 127] next). Two fp32 adds: the first rounds
    (IEEE round to nearest even at a spacing of 1), the second is exact."""
    return (v + RINT_MAGIC) - RINT_MAGIC


@triton.jit
def _quant(y, s, z):
    """The stored int8 value (as fp32, in [-128, 127]) of ``y`` on the grid (scale ``s``, stored zero point ``z``)."""
    return tl.minimum(tl.maximum(_rint(tl.div_rn(y, s)) + z, -128.0), 127.0)


@triton.jit
def _quant_inv(y, inv_s, z):
    """:func:`_quant` with the reciprocal of the scale (``inv_s = 1 / s``, once per program): a multiply instead
    of an IEEE division per element. ``y * (1/s)`` may differ from ``y / s`` in the last bit, which moves the
    result one step only when ``y / s`` is within an ulp of a rounding tie (the conv kernels' tests allow one
    step); the small elementwise kernels keep the exact division."""
    return tl.minimum(tl.maximum(_rint(y * inv_s) + z, -128.0), 127.0)


@triton.jit
def _f8_inv(y, inv_s):
    """The e4m3 value of ``y`` on an fp8 grid, given the reciprocal of its scale: ``y * inv_s`` saturated to
    +-448 (as ONNX QuantizeLinear's default), then converted with round to nearest even (one hardware cvt).
    As :func:`_quant_inv`, the multiply may move a value within an ulp of a rounding tie by one step."""
    return tl.minimum(tl.maximum(y * inv_s, -F8_MAX), F8_MAX).to(tl.float8e4nv)


@triton.jit
def _stored(y, s, z, F8: tl.constexpr):
    """The stored value (as fp32) of ``y`` on a grid of scale ``s``: e4m3 (``F8``; no zero point) or int8 (stored
    zero point ``z``), with an exact division (the small elementwise kernels)."""
    if F8:
        return tl.minimum(tl.maximum(tl.div_rn(y, s), -F8_MAX), F8_MAX).to(tl.float8e4nv).to(tl.float32)
    else:
        return _quant(y, s, z)


@triton.jit
def _load_q(ptrs, mask, zpi):
    """Stored 8-bit values as fp32 (int8 or e4m3, by the pointer's type); masked elements read the zero point."""
    if ptrs.dtype.element_ty == tl.float8e4nv:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=zpi).to(tl.float32)


@triton.jit
def _load_a(
    x_ptr,
    n,
    oh,
    ow,
    m_ok,
    kc,
    rk,
    a_scale,
    a_inv,
    a_zp,
    a_zpi,
    a_f8,
    H: tl.constexpr,
    W: tl.constexpr,
    CIN: tl.constexpr,
    XSN: tl.constexpr,
    XSC: tl.constexpr,
    XSH: tl.constexpr,
    XSW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BK: tl.constexpr,
    TAPS: tl.constexpr,
    CPT: tl.constexpr,
    A_FLOAT: tl.constexpr,
    DOT: tl.constexpr,
):
    """The [BM, BK] A tile of reduction chunk ``kc``, converted to the dot's operand type.

    TAPS: chunks never straddle a kernel tap (Cin padded to BK per tap), so the channel index is contiguous.
    Otherwise the flat reduction index k = (kh * KW + kw) * CIN + c is decomposed per element (small Cin).
    Positions outside the image read the value that stands for 0.0 (the zero point in int8)."""
    if TAPS:
        tap = kc // CPT
        c = (kc % CPT) * BK + rk
        kh = tap // KW
        kw = tap % KW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        mask = row_ok[:, None] & (c < CIN)[None, :]
        ptrs = x_ptr + (n * XSN + ih * XSH + iw * XSW)[:, None] + (c * XSC)[None, :]
    else:
        k = kc * BK + rk
        tap = k // CIN
        c = k % CIN
        kh = tap // KW
        kw = tap % KW
        ih = oh[:, None] * SH - PH + (kh * DH)[None, :]
        iw = ow[:, None] * SW - PW + (kw * DW)[None, :]
        mask = m_ok[:, None] & (k < KH * KW * CIN)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + n[:, None] * XSN + ih * XSH + iw * XSW + (c * XSC)[None, :]
    if A_FLOAT:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if DOT == 0:
            a = _quant_inv(x, a_inv, a_zp).to(tl.int8)
        elif DOT == 4:
            a = (_quant_inv(x, a_inv, a_zp) - a_zp).to(tl.float16)
        elif DOT == 1:
            a = x.to(tl.float16)
        elif DOT == 2:
            a = x
        else:  # e4m3: quantized on load (a_f8 = 1 / the input grid's scale)
            a = _f8_inv(x, a_f8)
    else:
        if DOT == 0:  # padding reads 0 (straight to shared memory); the epilogue corrects for it exactly
            a = tl.load(ptrs, mask=mask, other=0)
        elif (DOT == 3) or (DOT == 6):  # e4m3 straight to shared memory (no zero point: padding 0.0 is exact)
            a = tl.load(ptrs, mask=mask, other=0.0)
        elif DOT == 4:
            q = tl.load(ptrs, mask=mask, other=a_zpi)
            a = (q.to(tl.int32) - a_zpi).to(tl.float16)  # exact: |q - zp| <= 255
        else:  # a float layer after an int8 or fp8 one: dequantized on load
            x = (_load_q(ptrs, mask, a_zpi) - a_zp) * a_scale
            if DOT == 1:
                a = x.to(tl.float16)
            else:
                a = x
    return a


@triton.jit
def _gemm(
    acc,
    x_ptr,
    w_ptr,
    n,
    oh,
    ow,
    m_ok,
    rn,
    a_scale,
    a_inv,
    a_zp,
    a_zpi,
    a_f8,
    H: tl.constexpr,
    W: tl.constexpr,
    CIN: tl.constexpr,
    XSN: tl.constexpr,
    XSC: tl.constexpr,
    XSH: tl.constexpr,
    XSW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BK: tl.constexpr,
    TAPS: tl.constexpr,
    A_FLOAT: tl.constexpr,
    DOT: tl.constexpr,
):
    """``acc`` plus this conv's A x B over its whole reduction. B is packed [NP, KP], K contiguous, zero padded.

    DOT 5 runs on the CUDA cores instead: one reduction element at a time, an outer product of a column of
    A (centred int8 values) and a row of B per step (small reductions, where gathering tensor-core tiles
    costs more than the arithmetic)."""
    rk = tl.arange(0, BK)
    CPT: tl.constexpr = (CIN + BK - 1) // BK if TAPS else 1
    NK: tl.constexpr = KH * KW * CPT if TAPS else (KH * KW * CIN + BK - 1) // BK
    KP: tl.constexpr = NK * BK
    if DOT == 5:
        for k in range(KH * KW * CIN):
            tap = k // CIN
            c = k % CIN
            ih = oh * SH - PH + (tap // KW) * DH
            iw = ow * SW - PW + (tap % KW) * DW
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ptrs = x_ptr + n * XSN + ih * XSH + iw * XSW + c * XSC
            if A_FLOAT:
                a = _quant_inv(tl.load(ptrs, mask=ok, other=0.0).to(tl.float32), a_inv, a_zp) - a_zp
            else:
                a = tl.load(ptrs, mask=ok, other=a_zpi).to(tl.float32) - a_zp
            b = tl.load(w_ptr + rn * KP + k)
            acc += a[:, None] * b[None, :]
    else:
        for kc in range(NK):
            a = _load_a(
                x_ptr, n, oh, ow, m_ok, kc, rk, a_scale, a_inv, a_zp, a_zpi, a_f8,
                H, W, CIN, XSN, XSC, XSH, XSW, KH, KW, SH, SW, PH, PW, DH, DW, BK, TAPS, CPT, A_FLOAT, DOT,
            )  # fmt: skip
            b = tl.load(w_ptr + rn[None, :] * KP + (kc * BK + rk)[:, None])
            if DOT == 0:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            elif DOT == 2:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            elif DOT == 6:  # fp32 accumulation across chunks (see DOT_FP8_ACC32)
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)
            else:
                acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _conv_tile(
    pid,
    x_ptr,
    w_ptr,
    wsum_ptr,
    wtap_ptr,
    scale_ptr,
    bias_ptr,
    x2_ptr,
    w2_ptr,
    wsum2_ptr,
    scale2_ptr,
    res_ptr,
    out_ptr,
    out2_ptr,
    M,
    a_scale,
    a_zp,
    a_zpi,
    a_f8,
    a2_zpi,
    g0_scale,
    g0_zp,
    res_scale,
    res_zp,
    lo,
    hi,
    g1_scale,
    g1_zp,
    g2_scale,
    g2_zp,
    # geometry of the main conv
    H: tl.constexpr,
    W: tl.constexpr,
    CIN: tl.constexpr,
    XSN: tl.constexpr,
    XSC: tl.constexpr,
    XSH: tl.constexpr,
    XSW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    COUT: tl.constexpr,
    TAPS: tl.constexpr,
    A_FLOAT: tl.constexpr,
    DOT: tl.constexpr,
    BORDER: tl.constexpr,  # int8 input read as 0 outside the image: wtap (see border_table) corrects for it
    # the optional second GEMM (int8 or fp8, as the main one)
    HAS_SC: tl.constexpr,
    H2: tl.constexpr,
    W2: tl.constexpr,
    CIN2: tl.constexpr,
    X2SN: tl.constexpr,
    X2SH: tl.constexpr,
    X2SW: tl.constexpr,
    KH2: tl.constexpr,
    KW2: tl.constexpr,
    SH2: tl.constexpr,
    SW2: tl.constexpr,
    PH2: tl.constexpr,
    PW2: tl.constexpr,
    TAPS2: tl.constexpr,
    # epilogue
    Q0: tl.constexpr,  # 0 none, 1 fake-quant on an int8 grid, 2 on an fp8 grid
    RES: tl.constexpr,  # 0 none, 1 int8 or e4m3 (by res_ptr's type) on its grid, 2 float
    RSN: tl.constexpr,
    RSC: tl.constexpr,
    RSH: tl.constexpr,
    RSW: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 max(y, lo), 2 clamp(y, lo, hi)
    OUT: tl.constexpr,  # 0 float (out_ptr's dtype), 1 q1 stored, 2 q2 only, 3 both
    Q1_F8: tl.constexpr,  # grid 1 is fp8 (q1 stored as e4m3), else int8
    Q2_F8: tl.constexpr,
    NP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One [BM, BN] output tile (number ``pid``) of :func:`conv_kernel`: the GEMM(s) and the epilogue."""
    num_n: tl.constexpr = NP // BN
    pid_m = pid // num_n
    pid_n = pid % num_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n = rm // (OH * OW)
    r = rm % (OH * OW)
    oh = r // OW
    ow = r % OW

    if DOT == 0:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _gemm(
        acc, x_ptr, w_ptr, n, oh, ow, m_ok, rn, a_scale, 1.0 / a_scale, a_zp, a_zpi, a_f8,
        H, W, CIN, XSN, XSC, XSH, XSW, KH, KW, SH, SW, PH, PW, DH, DW, BK, TAPS, A_FLOAT, DOT,
    )  # fmt: skip
    if DOT == 0:
        if BORDER:  # the weight sum over the taps inside the image only (padding stands for the zero point):
            # wtap holds a row offset per output row (oh) and column (ow), then one [NP] sum per border pattern
            row = tl.load(wtap_ptr + oh) + tl.load(wtap_ptr + OH + ow)
            acc = acc - a_zpi * tl.load(wtap_ptr + row[:, None] + rn[None, :])
        else:
            acc = acc - a_zpi * tl.load(wsum_ptr + rn)[None, :]
    y = acc.to(tl.float32) * tl.load(scale_ptr + rn)[None, :] + tl.load(bias_ptr + rn)[None, :]
    if HAS_SC:  # int8 x int8 (DOT 0 or 4) or e4m3 x e4m3 (DOT 3), as the main GEMM
        if DOT == 0:
            acc2 = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = _gemm(
            acc2, x2_ptr, w2_ptr, n, oh, ow, m_ok, rn, 1.0, 1.0, a2_zpi * 1.0, a2_zpi, 1.0,
            H2, W2, CIN2, X2SN, 1, X2SH, X2SW, KH2, KW2, SH2, SW2, PH2, PW2, 1, 1, BK, TAPS2, False, DOT,
        )  # fmt: skip
        if DOT == 0:
            acc2 = acc2 - a2_zpi * tl.load(wsum2_ptr + rn)[None, :]
        y += acc2.to(tl.float32) * tl.load(scale2_ptr + rn)[None, :]
    if Q0 == 1:
        y = (_quant_inv(y, 1.0 / g0_scale, g0_zp) - g0_zp) * g0_scale
    elif Q0 == 2:
        y = _f8_inv(y, 1.0 / g0_scale).to(tl.float32) * g0_scale
    mask = m_ok[:, None] & (rn < COUT)[None, :]
    if RES == 1:
        rp = res_ptr + (n * RSN + oh * RSH + ow * RSW)[:, None] + (rn * RSC)[None, :]
        y += (_load_q(rp, mask, 0) - res_zp) * res_scale
    elif RES == 2:
        rp = res_ptr + (n * RSN + oh * RSH + ow * RSW)[:, None] + (rn * RSC)[None, :]
        y += tl.load(rp, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
        y = tl.maximum(y, lo)
    elif ACT == 2:
        y = tl.minimum(tl.maximum(y, lo), hi)
    offs = rm[:, None] * COUT + rn[None, :]
    if OUT == 0:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if Q1_F8:
            f1 = _f8_inv(y, 1.0 / g1_scale)
            if OUT != 2:
                tl.store(out_ptr + offs, f1, mask=mask)
            v1 = f1.to(tl.float32) * g1_scale
        else:
            q1 = _quant_inv(y, 1.0 / g1_scale, g1_zp)
            if OUT != 2:
                tl.store(out_ptr + offs, q1.to(tl.int8), mask=mask)
            v1 = (q1 - g1_zp) * g1_scale
        if OUT >= 2:
            if Q2_F8:
                tl.store(out2_ptr + offs, _f8_inv(v1, 1.0 / g2_scale), mask=mask)
            else:
                tl.store(out2_ptr + offs, _quant_inv(v1, 1.0 / g2_scale, g2_zp).to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["M", "a_zpi", "a2_zpi"])  # one compiled kernel for every batch size
def conv_kernel(
    x_ptr,
    w_ptr,
    wsum_ptr,
    wtap_ptr,
    scale_ptr,
    bias_ptr,
    x2_ptr,
    w2_ptr,
    wsum2_ptr,
    scale2_ptr,
    res_ptr,
    out_ptr,
    out2_ptr,
    M,
    a_scale,
    a_zp,
    a_zpi,
    a_f8,
    a2_zpi,
    g0_scale,
    g0_zp,
    res_scale,
    res_zp,
    lo,
    hi,
    g1_scale,
    g1_zp,
    g2_scale,
    g2_zp,
    # geometry of the main conv
    H: tl.constexpr,
    W: tl.constexpr,
    CIN: tl.constexpr,
    XSN: tl.constexpr,
    XSC: tl.constexpr,
    XSH: tl.constexpr,
    XSW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    COUT: tl.constexpr,
    TAPS: tl.constexpr,
    A_FLOAT: tl.constexpr,
    DOT: tl.constexpr,
    BORDER: tl.constexpr,  # int8 input read as 0 outside the image: wtap (see border_table) corrects for it
    # the optional second GEMM (int8 or fp8, as the main one)
    HAS_SC: tl.constexpr,
    H2: tl.constexpr,
    W2: tl.constexpr,
    CIN2: tl.constexpr,
    X2SN: tl.constexpr,
    X2SH: tl.constexpr,
    X2SW: tl.constexpr,
    KH2: tl.constexpr,
    KW2: tl.constexpr,
    SH2: tl.constexpr,
    SW2: tl.constexpr,
    PH2: tl.constexpr,
    PW2: tl.constexpr,
    TAPS2: tl.constexpr,
    # epilogue
    Q0: tl.constexpr,  # 0 none, 1 fake-quant on an int8 grid, 2 on an fp8 grid
    RES: tl.constexpr,  # 0 none, 1 int8 or e4m3 (by res_ptr's type) on its grid, 2 float
    RSN: tl.constexpr,
    RSC: tl.constexpr,
    RSH: tl.constexpr,
    RSW: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 max(y, lo), 2 clamp(y, lo, hi)
    OUT: tl.constexpr,  # 0 float (out_ptr's dtype), 1 q1 stored, 2 q2 only, 3 both
    Q1_F8: tl.constexpr,  # grid 1 is fp8 (q1 stored as e4m3), else int8
    Q2_F8: tl.constexpr,
    NP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PERSIST: tl.constexpr = 0,
):
    """The conv/linear layer as an implicit GEMM (see the module docstring). PERSIST = 0: one output tile per
    program. PERSIST > 0: a grid of PERSIST programs per SM, each looping over output tiles; the compiler flattens
    that loop nest, so the next tile's A and B loads are in flight while this tile's epilogue runs (gpu-notes.md,
    note 7)."""
    if PERSIST:
        num_tiles = tl.cdiv(M, BM) * (NP // BN)
        for pid in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _conv_tile(
                pid,
                x_ptr, w_ptr, wsum_ptr, wtap_ptr, scale_ptr, bias_ptr, x2_ptr, w2_ptr, wsum2_ptr, scale2_ptr,
                res_ptr, out_ptr, out2_ptr, M, a_scale, a_zp, a_zpi, a_f8, a2_zpi, g0_scale, g0_zp, res_scale,
                res_zp, lo, hi, g1_scale, g1_zp, g2_scale, g2_zp, H, W, CIN, XSN, XSC, XSH, XSW, KH, KW, SH, SW,
                PH, PW, DH, DW, OH, OW, COUT, TAPS, A_FLOAT, DOT, BORDER, HAS_SC, H2, W2, CIN2, X2SN, X2SH,
                X2SW, KH2, KW2, SH2, SW2, PH2, PW2, TAPS2, Q0, RES, RSN, RSC, RSH, RSW, ACT, OUT, Q1_F8, Q2_F8, NP, BM,
                BN, BK
            )  # fmt: skip
    else:
        _conv_tile(
            tl.program_id(0),
            x_ptr, w_ptr, wsum_ptr, wtap_ptr, scale_ptr, bias_ptr, x2_ptr, w2_ptr, wsum2_ptr, scale2_ptr,
            res_ptr, out_ptr, out2_ptr, M, a_scale, a_zp, a_zpi, a_f8, a2_zpi, g0_scale, g0_zp, res_scale,
            res_zp, lo, hi, g1_scale, g1_zp, g2_scale, g2_zp, H, W, CIN, XSN, XSC, XSH, XSW, KH, KW, SH, SW,
            PH, PW, DH, DW, OH, OW, COUT, TAPS, A_FLOAT, DOT, BORDER, HAS_SC, H2, W2, CIN2, X2SN, X2SH,
            X2SW, KH2, KW2, SH2, SW2, PH2, PW2, TAPS2, Q0, RES, RSN, RSC, RSH, RSW, ACT, OUT, Q1_F8, Q2_F8, NP, BM,
            BN, BK
        )  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def pool_kernel(
    x_ptr,
    out_ptr,
    M,
    in_scale,
    in_zp,
    out_scale,
    out_zp,
    H: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    IS_MAX: tl.constexpr,
    COUNT_PAD: tl.constexpr,
    OUT: tl.constexpr,  # 0: max -> the stored maximum; avg -> float. 1: on the out grid (out_ptr's type)
    BP: tl.constexpr,
    BC: tl.constexpr,
):
    """Max or average pooling over an int8 or e4m3 NHWC tensor, a [BP output pixels, BC channels] tile per
    program.

    Max pools the stored values (a monotonic grid commutes with max) and, with OUT=1, requantizes to the
    out grid (int8 or fp8, by ``out_ptr``'s type); average pools dequantized values in fp32 and stores them as
    float or quantized (OUT=1)."""
    rm = tl.program_id(0) * BP + tl.arange(0, BP)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    m_ok = rm < M
    c_ok = rc < C
    n = rm // (OH * OW)
    r = rm % (OH * OW)
    oh = r // OW
    ow = r % OW
    if x_ptr.dtype.element_ty == tl.float8e4nv:
        lowest = -F8_MAX
    else:
        lowest = -128.0
    if IS_MAX:
        acc = tl.full((BP, BC), lowest, tl.float32)
    else:
        acc = tl.zeros((BP, BC), dtype=tl.float32)
    for t in range(KH * KW):
        ih = oh * SH - PH + t // KW
        iw = ow * SW - PW + t % KW
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + rc[None, :]
        inside = ok[:, None] & c_ok[None, :]
        v = tl.where(inside, _load_q(ptrs, inside, 0), lowest)  # outside: the lowest stored value
        if IS_MAX:
            acc = tl.maximum(acc, v)
        else:
            acc += tl.where(ok[:, None], v - in_zp, 0.0)
    mask = m_ok[:, None] & c_ok[None, :]
    offs = rm[:, None] * C + rc[None, :]
    f8_out: tl.constexpr = out_ptr.dtype.element_ty == tl.float8e4nv
    if IS_MAX:
        if OUT == 1:
            acc = _stored((acc - in_zp) * in_scale, out_scale, out_zp, f8_out)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if COUNT_PAD:
            count = tl.full((BP,), KH * KW, tl.float32)
        else:
            h0 = oh * SH - PH
            w0 = ow * SW - PW
            hs = tl.minimum(h0 + KH, H) - tl.maximum(h0, 0)
            ws = tl.minimum(w0 + KW, W) - tl.maximum(w0, 0)
            count = (hs * ws).to(tl.float32)
        y = acc * in_scale / count[:, None]
        if OUT == 1:
            tl.store(out_ptr + offs, _stored(y, out_scale, out_zp, f8_out).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["numel"])
def requant_kernel(x_ptr, out_ptr, numel, in_scale, in_zp, out_scale, out_zp, lo, BLOCK: tl.constexpr):
    """8-bit -> 8-bit on another grid (int8 or e4m3 each, by the pointers' types; double rounding as Q(DQ(q))),
    then max(q, lo) (ReLU on stored values)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    q = _load_q(x_ptr + offs, ok, 0)
    q2 = tl.maximum(_stored((q - in_zp) * in_scale, out_scale, out_zp, out_ptr.dtype.element_ty == tl.float8e4nv), lo)
    tl.store(out_ptr + offs, q2.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def quantize_kernel(
    x_ptr,
    out_ptr,
    M,
    scale,
    zp,
    C: tl.constexpr,
    XSN: tl.constexpr,
    XSC: tl.constexpr,
    XSP: tl.constexpr,
    P: tl.constexpr,
    BM: tl.constexpr,
    BC: tl.constexpr,
):
    """A float tensor (logical [N, C, P] with any strides, P = H*W flattened) -> int8 or e4m3 (out_ptr's type)
    NHWC ([N*P, C])."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    n = rm // P
    p = rm % P
    mask = (rm < M)[:, None] & (rc < C)[None, :]
    x = tl.load(x_ptr + (n * XSN + p * XSP)[:, None] + (rc * XSC)[None, :], mask=mask, other=0.0)
    q = _stored(x.to(tl.float32), scale, zp, out_ptr.dtype.element_ty == tl.float8e4nv)
    tl.store(out_ptr + rm[:, None] * C + rc[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@functools.cache
def sm_count() -> int:
    """Multiprocessors of the current GPU (4 under the CPU interpreter: a persistent grid still loops there)."""
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def launch_conv(args: dict, consts: dict, config: KernelConfig, m: int, warmup: bool = False) -> None:
    """Launch :func:`conv_kernel` for ``m`` output rows: ``args`` are the tensors and runtime scalars,
    ``consts`` the compile-time geometry and epilogue (see the kernel signature). ``warmup``: compile only."""
    tiles = triton.cdiv(m, config.bm) * (consts["NP"] // config.bn)
    grid = (min(tiles, config.persist * sm_count()) if config.persist else tiles,)
    kwargs = dict(M=m, BM=config.bm, BN=config.bn, BK=config.bk, PERSIST=config.persist)
    kwargs.update(num_warps=config.warps, num_stages=config.stages)
    if warmup:
        conv_kernel.warmup(grid=grid, **kwargs, **args, **consts)
    else:
        conv_kernel[grid](**kwargs, **args, **consts)


def launch_pool(x: torch.Tensor, out: torch.Tensor, m: int, scalars: dict, consts: dict) -> None:
    bc = min(128, next_pow2(max(consts["C"], 16)))
    bp = max(1, 2048 // bc)
    pool_kernel[(triton.cdiv(m, bp), triton.cdiv(consts["C"], bc))](x, out, m, **scalars, **consts, BP=bp, BC=bc)


def launch_requant(x: torch.Tensor, out: torch.Tensor, scalars: dict) -> None:
    numel = x.numel()
    block = 1024
    requant_kernel[(triton.cdiv(numel, block),)](x, out, numel, **scalars, BLOCK=block)


def launch_quantize(x: torch.Tensor, out: torch.Tensor, m: int, scale: float, zp: float, consts: dict) -> None:
    bc = min(64, next_pow2(max(consts["C"], 4)))
    bm = max(16, 4096 // bc // 4)
    quantize_kernel[(triton.cdiv(m, bm), triton.cdiv(consts["C"], bc))](x, out, m, scale, zp, **consts, BM=bm, BC=bc)
