"""What the compiler makes of the cuda backend's fp8 kernels, checked without a GPU: every fp8 conv kernel
variant (main conv with each epilogue, the shortcut GEMM, the stem's quantize-on-load, a linear layer) compiles
for sm_90 (Hopper) ahead of time, and its main loop issues the e4m3 wgmma pipelined: in the TTGIR some
``warp_group_dot_wait`` keeps ``pendings >= 1`` (the next wgmma is issued before the last one finished), which
Triton 3.6 never does for int8 wgmma (``pendings = 0`` everywhere; checked here too, as the contrast).

The compiles run in a subprocess without ``TRITON_INTERPRET`` (other test modules set it for this process).
By default a few tile configs per kernel variant; ``MIXQ_CUDA_AOT_ALL=1`` compiles every tuning candidate
(the run recorded in benchmarks/results/gpu-notes.md, note 8)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'mixq[cuda]')", allow_module_level=True)


def _geometry(cin, h, cout, k, s, p, oh=None):
    oh = (h + 2 * p - k) // s + 1 if oh is None else oh
    return {"cin": cin, "h": h, "w": h, "kh": k, "kw": k, "sh": s, "sw": s, "ph": p, "pw": p, "dh": 1, "dw": 1,
            "cout": cout, "oh": oh, "ow": oh}  # fmt: skip


def _variants(mode: str):
    """(name, QConv, Plan) of ResNet-18 CIFAR layer shapes with each kind of fp8 (or int8) kernel."""
    from mixq.backends.cuda.lower import F8Grid, Grid, Plan, QConv, Shortcut, TensorInfo

    grid = F8Grid(0.05) if mode == "fp8" else Grid(0.05, -3)
    dtype = grid.dtype

    def weight(cout, cin, k):
        if mode == "fp8":
            return np.ones((cout, cin, k, k), np.float32)
        return np.ones((cout, cin, k, k), np.int8)

    def conv(name, g, **kw):
        cout, cin, k = g["cout"], g["cin"], g["kh"]
        return QConv(name, mode, 0, False, grid, weight(cout, cin, k), np.ones(cout), np.zeros(cout), g, out=9, **kw)

    tensors = {0: TensorInfo(0, (64, 32, 32), dtype), 1: TensorInfo(1, (64, 32, 32), dtype),
               2: TensorInfo(2, (64, 32, 32), dtype), 3: TensorInfo(3, (3, 32, 32), "fp32"),
               4: TensorInfo(4, (512,), dtype), 6: TensorInfo(6, (64, 32, 32), "fp32")}  # fmt: skip
    out = {9: TensorInfo(9, (64, 32, 32), dtype)}
    relu = (0.0, float("inf"))
    l1 = _geometry(64, 32, 64, 3, 1, 1)
    variants = [
        ("layer1 conv1 +relu ->8bit", conv("a", l1, out_grid=grid, act=relu), out),
        ("layer1 conv2 +residual(8bit) +relu ->8bit", conv("b", l1, out_grid=grid, act=relu, res=(1, grid)), out),
        ("layer1 conv +fq +residual(float) ->fp32", conv("c", l1, q0=grid, res=(6, None)), out),
        ("layer1 conv ->8bit + int8", conv("d", l1, out_grid=grid, out2=8, out2_grid=Grid(0.1, 0)), out),
    ]
    g2 = _geometry(128, 16, 128, 3, 1, 1)
    sc = Shortcut("sc", 2, grid, weight(128, 64, 1), np.ones(128), np.zeros(128), _geometry(64, 32, 128, 1, 2, 0))
    variants.append(("layer2.0 conv2 +shortcut gemm +relu ->8bit", conv("e", g2, out_grid=grid, act=relu, sc=sc),
                     {9: TensorInfo(9, (128, 16, 16), dtype)}))  # fmt: skip
    g4 = _geometry(512, 4, 512, 3, 1, 1)
    variants.append(
        ("layer4 conv +relu ->8bit", conv("f", g4, out_grid=grid, act=relu), {9: TensorInfo(9, (512, 4, 4), dtype)})
    )
    stem = conv("g", _geometry(3, 32, 64, 3, 1, 1), out_grid=grid, act=relu)
    stem.x, stem.x_float = 3, True
    variants.append(("stem quantize-on-load +relu ->8bit", stem, out))
    fc = conv("h", _geometry(512, 1, 10, 1, 1, 0))
    fc.x = 4
    variants.append(("linear ->fp32", fc, {9: TensorInfo(9, (10,), "fp32")}))
    return [(name, op, Plan([], {**tensors, **o}, 9, (1,))) for name, op, o in variants]


def _compile_all(mode: str, every: str) -> None:
    """Subprocess body: compile each variant with some (or every) tuning candidate; print JSON lines."""
    import torch

    from mixq.backends.cuda.compile import aot_compile, wgmma_waits
    from mixq.backends.cuda.runners import ConvRunner, _taps, candidate_configs

    for name, op, plan in _variants(mode):
        configs = [c for c in candidate_configs(op) if c.math in ("int8", "acc32") and not c.persist]
        configs = configs if every == "1" else configs[:2]
        for config in configs:
            strides = {3: (3 * 32 * 32, 32 * 32, 32, 1), 6: (64 * 32 * 32, 1, 32 * 64, 64)}  # NCHW, NHWC
            kernel = aot_compile(ConvRunner(op, plan, torch.device("cpu"), config), 128, 90, strides)
            g = op.geometry
            taps, k = g["kh"] * g["kw"], g["kh"] * g["kw"] * g["cin"]
            steps = taps * -(-g["cin"] // config.bk) if _taps(g) else -(-k // config.bk)
            ttgir = kernel.asm["ttgir"]
            mma = "wgmma" if "warp_group_dot" in ttgir else "mma.sync"
            row = {"variant": name, "config": str(config), "waits": wgmma_waits(ttgir), "k_steps": steps,
                   "shared": kernel.metadata.shared, "mma": mma}  # fmt: skip
            print(json.dumps(row), flush=True)


def _run(mode: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    every = os.environ.get("MIXQ_CUDA_AOT_ALL", "0")
    code = f"from test_cuda_aot import _compile_all; _compile_all({mode!r}, {every!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_fp8_kernels_compile_for_sm90_with_pipelined_wgmma():
    rows = _run("fp8")
    assert len(rows) >= 2 * 8
    wgmma = [r for r in rows if r["mma"] == "wgmma"]
    assert len(wgmma) == len(rows), rows  # every candidate tile has 64 rows or more: wgmma on Hopper
    loops = [r for r in wgmma if r["k_steps"] > 1]  # the stem (K = 27) is one k-step: no loop to pipeline
    assert {r["variant"] for r in wgmma} - {r["variant"] for r in loops} <= {"stem quantize-on-load +relu ->8bit"}
    not_pipelined = [r for r in loops if max(r["waits"], default=0) < 1]
    assert not not_pipelined, not_pipelined


def test_int8_wgmma_is_not_pipelined_by_this_triton():
    """The contrast that motivates fp8 layers (gpu-notes.md notes 1 and 8): if a Triton upgrade pipelines int8
    wgmma, this fails and the notes need revisiting."""
    rows = [r for r in _run("int8") if r["mma"] == "wgmma"]
    assert rows and all(max(r["waits"], default=0) == 0 for r in rows), rows
