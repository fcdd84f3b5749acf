"""How far is a GPU's e4m3 tensor-core accumulation from exact? The raw accumulator of the ``cuda`` backend's
fp8 conv kernel (scale 1, bias 0, float output) on random e4m3 data spread over 12 binades, against the exact
float64 sum, per tile config (32-row tiles run mma.sync, taller ones wgmma), and its ratio to the worst-case
bound the kernel tests use (``acc_bound`` in mixq.zoo.cuda_cases, shared with tests/backends/test_cuda_kernels.py).

    PYTHONPATH=src python benchmarks/fp8_accumulation.py      (from the repository root, on a GPU)

Output of the committed run: benchmarks/results/fp8-accumulation-h100.log (H100 80GB HBM3, driver 580.159.04,
torch 2.11, Triton 3.6.0, code 40ab18f).
"""

import math

import numpy as np
import torch

import mixq.zoo.cuda_cases as T
from mixq.backends.cuda.engine import ConvRunner
from mixq.backends.cuda.kernels import KernelConfig
from mixq.backends.cuda.lower import F8Grid, QConv

DEVICE = T.DEVICE
CONFIGS = [KernelConfig(32, 16, 32, 4, 2), KernelConfig(64, 32, 64, 4, 3), KernelConfig(64, 64, 128, 4, 3),
           KernelConfig(64, 64, 64, 4, 3), KernelConfig(128, 64, 64, 4, 4)]  # fmt: skip

for name, shape in T.CONV_SHAPES.items():
    op, geo, gx, acc, s_abs, env = T.fp8_conv_case(shape, torch.Generator().manual_seed(5))
    n, cin, h, w, cout, k, s, pad = shape
    op = QConv("conv", "fp8", T.X, False, F8Grid(1.0), op.weight, np.ones(cout), np.zeros(cout), geo,
               out=T.OUT, out_grid=None)  # fmt: skip
    plan = T.plan_for({T.X: ((cin, h, w), "fp8"), T.OUT: ((cout, geo["oh"], geo["ow"]), "fp32")})
    bound = T.acc_bound(s_abs, geo)
    for config in CONFIGS:
        outputs = dict(env)
        ConvRunner(op, plan, torch.device(DEVICE), config)(outputs)
        err = (outputs[T.OUT].double().cpu() - acc).abs()
        rel = float((err / s_abs.clamp(min=1e-30)).max())
        bits = -math.log2(rel) if rel > 0 else float("inf")
        print(f"{name:16s} {config!s:18s} K={cin * k * k:5d} max|err|={float(err.max()):.3e} max err/S={rel:.3e} "
              f"(~{bits:.1f} bits of S) err/bound max={float((err / bound).max()):.3f} "
              f"over={int((err > bound).sum())}/{err.numel()}", flush=True)  # fmt: skip
