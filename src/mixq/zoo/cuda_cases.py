"""Random cases for the ``cuda`` backend's conv kernels and the fp8 accumulation bound, shared by
tests/backends/test_cuda_kernels.py and benchmarks/fp8_accumulation.py (which measures the bound on a GPU).

Importing this imports the backend's lowering (no Triton): a test that runs the kernels through Triton's
interpreter sets ``TRITON_INTERPRET=1`` before it imports the kernels, not this module's business.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.cuda.lower import F8Grid, Plan, QConv, TensorInfo
from ..spec import FP8_E4M3

__all__ = [
    "DEVICE",
    "X",
    "RES",
    "X2",
    "OUT",
    "OUT2",
    "CONV_SHAPES",
    "F8_BITS",
    "WGMMA_K",
    "FP32_ACCUMULATION",
    "nhwc",
    "geometry",
    "plan_for",
    "e4m3",
    "rand_e4m3",
    "rand_f8_grid",
    "acc_bound",
    "fp8_conv_case",
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
X, RES, X2, OUT, OUT2 = 0, 1, 2, 3, 4  # tensor ids of a runner's environment

# (batch, cin, h, w, cout, k, stride, pad): odd channel counts, batch 1, stride 2, 1x1 and 5x5
CONV_SHAPES = {
    "cin3-3x3-pad": (2, 3, 7, 7, 5, 3, 1, 1),
    "batch1-5x5-pad2": (1, 20, 6, 5, 17, 5, 1, 2),
    "cin33-stride2": (2, 33, 7, 7, 24, 3, 2, 1),
    "1x1": (3, 40, 5, 5, 19, 1, 1, 0),
    "linear": (5, 70, 1, 1, 10, 1, 1, 0),
}

# The accumulation model of acc_bound (an assumption, not a measurement): each e4m3 wgmma instruction
# (K = 32) adds its products after aligning all 33 addends to the largest exponent among them and keeping
# F8_BITS bits below it (truncating). fp32 accumulation (Triton's interpreter, mma.sync) is far inside it.
F8_BITS = 13
WGMMA_K = 32
FP32_ACCUMULATION = DEVICE == "cpu"  # the interpreter sums the exact fp32 products in fp32


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous()


def geometry(cin, h, w, cout, k, s, p):
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return {"cin": cin, "h": h, "w": w, "kh": k, "kw": k, "sh": s, "sw": s, "ph": p, "pw": p, "dh": 1, "dw": 1,
            "cout": cout, "oh": oh, "ow": ow}  # fmt: skip


def plan_for(tensors: dict) -> Plan:
    return Plan([], {t: TensorInfo(t, shape, dtype) for t, (shape, dtype) in tensors.items()}, OUT, (1,))


def e4m3(t: torch.Tensor) -> torch.Tensor:
    """Round to e4m3 (nearest even, saturating at +-448), as float64."""
    return t.clamp(-FP8_E4M3.max, FP8_E4M3.max).float().to(torch.float8_e4m3fn).double()


def rand_e4m3(shape, gen, binades: int = 6) -> torch.Tensor:
    """Random e4m3 values over 2 * binades binades around 4 (subnormals included), both signs."""
    mag = torch.exp2(torch.rand(shape, generator=gen, dtype=torch.float64) * 2 * binades - binades + 2)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    return e4m3(mag * sign)


def rand_f8_grid(gen) -> F8Grid:
    return F8Grid(float(np.float32(0.002 + 0.05 * torch.rand((), generator=gen).item())))


def acc_bound(s_abs: torch.Tensor, geo: dict) -> torch.Tensor:
    """Bound on |acc - exact| of an e4m3 GEMM, in the accumulator's units. On a GPU (model above): instructions
    counted for either reduction order the kernel uses (taps padded per BK <= 128, or flat), zero padding
    included (it adds nothing, so it is safe). A worst case: 33 truncations per instruction, so it is loose
    (0.4 S for K = 297). In the interpreter (fp32 accumulation of exact products): each of the at most
    n_terms adds rounds by at most 2**-24 of a partial sum, and every partial sum is at most S."""
    taps, k = geo["kh"] * geo["kw"], geo["kh"] * geo["kw"] * geo["cin"]
    n = taps * -(-geo["cin"] // 128) * 128 // WGMMA_K + -(-k // 128) * 128 // WGMMA_K
    if FP32_ACCUMULATION:
        return n * WGMMA_K * 2.0**-24 * s_abs
    return n * (WGMMA_K + 1) * 2.0 ** (1 - F8_BITS) * s_abs


def fp8_conv_case(shape, gen, weight_binades: int = 6):
    """A random fp8 conv of ``shape`` (see CONV_SHAPES): (op, geometry, input grid, exact float64 accumulator,
    S = sum of |products|, runner environment with the e4m3 NHWC input on DEVICE)."""
    n, cin, h, w, cout, k, s, p = shape
    geo = geometry(cin, h, w, cout, k, s, p)
    gx = rand_f8_grid(gen)
    x8 = rand_e4m3((n, cin, h, w), gen)
    w8 = rand_e4m3((cout, cin, k, k), gen, weight_binades)
    w_scale = (0.001 + 0.01 * torch.rand(cout, generator=gen, dtype=torch.float64)).numpy()
    bias = (torch.randn(cout, generator=gen, dtype=torch.float64) * 0.5).numpy()
    op = QConv("conv", "fp8", X, False, gx, w8.numpy().astype(np.float32), w_scale, bias, geo)
    env = {X: nhwc(x8).to(torch.float8_e4m3fn).to(DEVICE)}
    acc = F.conv2d(x8, w8, stride=s, padding=p)  # float64: exact (products of 8 significant bits)
    s_abs = F.conv2d(x8.abs(), w8.abs(), stride=s, padding=p)
    return op, geo, gx, acc, s_abs, env
