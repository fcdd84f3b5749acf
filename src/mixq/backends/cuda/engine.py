"""Native GPU backend ``cuda`` (torch + Triton): the Q/DQ graph lowered to fused int8 Triton kernels
(:mod:`.lower`, :mod:`.kernels`), replayed as one CUDA graph per batch size.

- int8 convs/linears: int8 tensor-core GEMMs with int32 accumulation and the whole epilogue fused (scale,
  bias, residual add or the shortcut conv as a second GEMM, ReLU/clip, requantization), so activations stay
  int8 channels-last between quantized layers; the network input is quantized as the first conv loads it.
- fp8 layers (input and weight through FLOAT8E4M3FN Q/DQ): e4m3 tensor-core GEMMs (fp32 accumulation) with A
  read straight from the e4m3 NHWC activation and the same fused epilogue, activations staying e4m3
  channels-last between fp8 layers; pools, requantization (fp8 <-> fp8, fp8 <-> int8), quantize and
  dequantize on e4m3 tensors too.
- fp16 layers: the same kernel with fp16 operands (fp32 accumulation).
- float layers run as they are in torch (fp32 with TF32 off).
- Kernel tile configs are chosen per layer shape at build time by timing candidates on the GPU (at the
  optimization batch) and stored in the engine file, so loading needs no tuning.

The engine file holds the Q/DQ ONNX model and the kernel configs; the model is lowered again where it
is loaded (the lowering is deterministic), so the file carries no compiled code.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..base import (
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    check_fp8_support,
    layer_of_node,
    read_engine_file,
    register_backend,
)
from .lower import has_border

__all__ = ["CudaBackend", "CudaEngine", "build_engine", "candidate_configs", "default_config"]

MAX_GRAPHS = 8  # CUDA graphs kept (one per batch size, least recently used dropped)
KERNELS_MEMBER = "kernels.json"


def _kernels():
    from . import kernels as cuda_kernels

    return cuda_kernels


# ------------------------------------------------------------------------------------------ configs


def _taps(g: dict) -> bool:
    """Chunk the reduction per kernel tap (contiguous channel loads) unless Cin is small."""
    return g["kh"] * g["kw"] == 1 or g["cin"] >= 32


def _max_bk(op, taps: bool) -> int:
    k = op.geometry["cin"] if taps else op.geometry["cin"] * op.geometry["kh"] * op.geometry["kw"]
    return max(32, min(128, _kernels().next_pow2(k)))


FMA_MAX_K = 518  # int8 products summed in fp32 stay exact: 518 * 255 * 127 < 2**24


def _reduction(g: dict) -> int:
    return g["cin"] * g["kh"] * g["kw"]


def fp8_accumulation() -> str:
    """How fp8 GEMMs accumulate: ``acc32`` (default: fp32 across BK-long chunks, as the fake-quant model sums)
    or, with ``MIXQ_CUDA_FP8_ACC=reduced``, ``int8`` (the tensor cores' reduced precision over the whole
    reduction: faster, but deep nets lose fidelity, docs/cuda-fp8.md)."""
    return "int8" if os.environ.get("MIXQ_CUDA_FP8_ACC", "acc32") == "reduced" else "acc32"


def default_config(op) -> object:
    """A config that fits the layer (used without tuning: on the CPU interpreter, or as the fallback)."""
    k = _kernels()
    bn = max(16, min(128, k.next_pow2(op.geometry["cout"])))
    bk = min(64, _max_bk(op, _taps(op.geometry)))
    return k.KernelConfig(64, bn, bk, 4, 3, fp8_accumulation() if op.mode == "fp8" else "int8")


# (bm, bn, bk, warps, stages, math[, persist]): tensor-core tiles for int8 (int32 accumulation) and for int8 values on
# the fp16 tensor cores, then CUDA-core tiles for small reductions
_TENSOR_CORE = [
    (128, 128, 64, 8, 3, "int8"),
    (64, 128, 64, 4, 4, "int8"),
    (64, 64, 64, 4, 3, "int8"),
    (128, 128, 128, 8, 3, "int8"),
    (128, 128, 64, 8, 3, "f16"),
    (128, 64, 64, 4, 4, "f16"),
    (64, 128, 64, 4, 4, "f16"),
    (128, 256, 64, 8, 3, "f16"),
    (64, 64, 64, 4, 4, "f16"),
    (128, 128, 32, 4, 4, "f16"),
    (32, 64, 64, 4, 3, "int8"),  # tiles of 32 rows run mma.sync, which Triton 3.6 pipelines for int8 (its
    (32, 128, 64, 4, 4, "int8"),  # int8 wgmma it does not): for layers with few output rows and long reductions
    (128, 64, 64, 4, 4, "int8"),  # taller tiles for 64-channel layers: fewer weight-tile reads per output
    (256, 64, 64, 8, 3, "int8"),  # (gpu-notes.md, note 7)
    (64, 128, 128, 4, 3, "int8"),  # long reductions: half the wgmma waits of BK = 64 with one warpgroup
    (64, 64, 64, 4, 4, "int8", 3),  # persistent grids (programs per SM): the next tile's loads overlap
    (128, 64, 64, 8, 3, "int8", 1),  # this tile's epilogue
    (64, 128, 64, 4, 4, "int8", 2),
    (128, 128, 128, 8, 3, "int8", 1),
]
_FMA = [(128, 64, 32, 4, 1, "fma"), (64, 64, 32, 4, 1, "fma"), (256, 32, 32, 8, 1, "fma")]
_FLOAT = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (64, 32, 64, 4, 4)]
_FP8 = [  # e4m3 tensor-core tiles (wgmma pipelined by Triton 3.6: gpu-notes.md, note 8)
    (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3),
    (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3),
]  # fmt: skip


def candidate_configs(op) -> list:
    """Tile configs worth timing for one conv/linear layer (deduplicated, clipped to the layer's size)."""
    k = _kernels()
    max_bn = max(16, k.next_pow2(op.geometry["cout"]))
    max_bk = _max_bk(op, _taps(op.geometry))
    if op.mode == "int8":
        base = list(_TENSOR_CORE)
        if _reduction(op.geometry) <= FMA_MAX_K and op.sc is None:
            base += _FMA
        if op.x_float:  # or quantize the float input in a pass of its own, then read int8 (fewer bytes gathered)
            base += [(*c[:5], "q+" + c[5], *c[6:]) for c in base if c[5] != "f16"]
    elif op.mode == "fp8":
        base = [(*c, fp8_accumulation()) for c in _FP8]
    else:
        base = [(*c, "int8") for c in _FLOAT]
    if os.environ.get("MIXQ_CUDA_PERSIST", "1") == "0":  # leave the persistent-grid tiles out of the tuning
        base = [c for c in base if len(c) < 7]
    out = []
    for bm, bn, bk, warps, stages, math, *persist in base:
        cfg = k.KernelConfig(bm, min(bn, max_bn), min(bk, max_bk), warps, stages, math, *persist)
        if cfg not in out:
            out.append(cfg)
    return out


def _inside_taps(size: int, out: int, k: int, stride: int, pad: int, dil: int) -> tuple[list[int], list[tuple]]:
    """Per output position along one axis, the index of its pattern (which kernel taps fall inside the
    image), and the distinct patterns (tuples of booleans, one per tap)."""
    patterns, index = [], []
    for o in range(out):
        inside = tuple(0 <= o * stride - pad + t * dil < size for t in range(k))
        if inside not in patterns:
            patterns.append(inside)
        index.append(patterns.index(inside))
    return index, patterns


def border_table(weight: np.ndarray, g: dict, np_cols: int) -> np.ndarray:
    """The int32 table the conv kernel's BORDER epilogue reads (the input is read as 0 outside the image, so
    ``acc - zp * sum(w over the taps inside)`` is the exact result): ``[OH]`` row offsets, ``[OW]`` column
    offsets, then one ``[np_cols]`` weight sum per (row pattern, column pattern). Output pixel (oh, ow) finds
    its sums at ``table[table[oh] + table[OH + ow] + c]``; a 3x3 conv with padding 1 has 3 x 3 patterns."""
    hi, hpat = _inside_taps(g["h"], g["oh"], g["kh"], g["sh"], g["ph"], g["dh"])
    wi, wpat = _inside_taps(g["w"], g["ow"], g["kw"], g["sw"], g["pw"], g["dw"])
    per_tap = weight.astype(np.int64).sum(1)  # [Cout, KH, KW]
    head = g["oh"] + g["ow"]
    sums = np.zeros((len(hpat), len(wpat), np_cols), dtype=np.int64)
    for a, hin in enumerate(hpat):
        for b, win in enumerate(wpat):
            sums[a, b, : g["cout"]] = per_tap[:, np.array(hin)][:, :, np.array(win)].sum((1, 2))
    rows = head + np.array(hi, dtype=np.int64) * len(wpat) * np_cols
    cols = np.array(wi, dtype=np.int64) * np_cols
    return np.concatenate([rows, cols, sums.reshape(-1)]).astype(np.int32)


# ------------------------------------------------------------------------------------------ runners


STORED = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # torch storage of 8-bit tensors (plan dtype)


def _is_fp8(grid) -> bool:
    return grid is not None and grid.dtype == "fp8"


def _storage_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-image storage of an int8 tensor: NHWC (C, H, W) -> (H, W, C); (C, L) -> (1, L, C); flat as is."""
    if len(shape) == 3:
        return (shape[1], shape[2], shape[0])
    if len(shape) == 2:
        return (1, shape[1], shape[0])
    return tuple(shape)


def _nhwc_strides(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(n, c, h, w) element strides of an int8 tensor in its NHWC storage (a flat one: [N, F])."""
    if len(shape) == 1:
        return shape[0], 1, 0, 0
    h, w, c = _storage_shape(shape)
    return h * w * c, 1, w * c, c


def _float_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(n, c, h, w) strides of a float activation of logical shape [N, C], [N, C, L] or [N, C, H, W]."""
    s = t.stride()
    if t.dim() == 4:
        return s[0], s[1], s[2], s[3]
    if t.dim() == 3:
        return s[0], s[1], 0, s[2]
    return s[0], s[1], 0, 0


class _Runner:
    """One op of the plan on the device: ``__call__(env)`` reads its inputs from ``env`` and writes its output
    (into a buffer already in ``env`` under the output's id when there is one of the right shape and type,
    as the tests do with poisoned buffers)."""

    op = None

    def outputs(self) -> tuple[int, ...]:
        return tuple(t for t in (getattr(self.op, "out", None), getattr(self.op, "out2", None)) if t is not None)

    @staticmethod
    def buffer(env: dict, tid: int, shape: tuple, dtype, device) -> torch.Tensor:
        given = env.get(tid)
        if isinstance(given, torch.Tensor) and tuple(given.shape) == tuple(shape) and given.dtype == dtype:
            return given
        return torch.empty(shape, device=device, dtype=dtype)


class ConvRunner(_Runner):
    def __init__(self, op, plan, device: torch.device, config):
        k = _kernels()
        self.op, self.plan, self.device, self.config = op, plan, device, config
        g = op.geometry
        self.prequant = op.mode == "int8" and op.x_float and config.math.startswith("q+")
        if op.mode == "int8":
            self.dot = {"int8": k.DOT_INT8, "f16": k.DOT_I8F16, "fma": k.DOT_FMA}[config.math.removeprefix("q+")]
        else:
            self.dot = {"fp16": k.DOT_FP16, "fp32": k.DOT_FP32, "fp8": k.DOT_FP8}[op.mode]
            if op.mode == "fp8" and config.math == "acc32":
                self.dot = k.DOT_FP8_ACC32
        self.taps = _taps(g) and self.dot != k.DOT_FMA
        self.np = -(-g["cout"] // config.bn) * config.bn
        dtype = {
            k.DOT_INT8: torch.int8, k.DOT_I8F16: torch.float16, k.DOT_FMA: torch.float32, k.DOT_FP16: torch.float16,
            k.DOT_FP32: torch.float32, k.DOT_FP8: torch.float8_e4m3fn, k.DOT_FP8_ACC32: torch.float8_e4m3fn,
        }[self.dot]  # fmt: skip
        self.w = self._pack(op.weight, g, self.taps, dtype)
        scale = op.w_scale * (op.grid.scale if op.mode in ("int8", "fp8") else 1.0)  # s_x * s_w[c]
        bias = op.bias.copy()
        self.sc_args = {}
        sc_consts = {"HAS_SC": False, "H2": 1, "W2": 1, "CIN2": 1, "X2SN": 1, "X2SH": 1, "X2SW": 1, "KH2": 1,
                     "KW2": 1, "SH2": 1, "SW2": 1, "PH2": 0, "PW2": 0, "TAPS2": True}  # fmt: skip
        if op.sc is not None:
            sg = op.sc.geometry
            taps2 = _taps(sg)
            self.w2 = self._pack(op.sc.weight, sg, taps2, dtype)
            wsum2 = op.sc.weight.reshape(g["cout"], -1).astype(np.int64).sum(1) if op.mode == "int8" else []
            self.wsum2 = self._vec(wsum2, torch.int32)
            self.scale2 = self._vec(op.sc.w_scale * op.sc.grid.scale, torch.float32)
            bias = bias + op.sc.bias
            n2, _, h2s, w2s = _nhwc_strides(plan.tensors[op.sc.x].shape)
            sc_consts = {"HAS_SC": True, "H2": sg["h"], "W2": sg["w"], "CIN2": sg["cin"], "X2SN": n2, "X2SH": h2s,
                         "X2SW": w2s, "KH2": sg["kh"], "KW2": sg["kw"], "SH2": sg["sh"], "SW2": sg["sw"],
                         "PH2": sg["ph"], "PW2": sg["pw"], "TAPS2": taps2}  # fmt: skip
        wsum = (
            op.weight.reshape(g["cout"], -1).astype(np.int64).sum(1) if self.dot == k.DOT_INT8 else np.zeros(g["cout"])
        )
        self.wsum = self._vec(wsum, torch.int32)
        a_float = op.x_float and not self.prequant
        self.border = self.dot == k.DOT_INT8 and not a_float and has_border(g)
        self.wtap = self.wsum
        if self.border:  # the weight sums over the taps inside the image, one per border pattern of a pixel
            self.wtap = torch.from_numpy(border_table(op.weight, g, self.np)).to(device)
        self.scale = self._vec(scale, torch.float32)
        self.bias = self._vec(bias, torch.float32)
        self.dummy = torch.zeros(16, device=device, dtype=torch.int8)
        self.consts = {
            "H": g["h"], "W": g["w"], "CIN": g["cin"], "KH": g["kh"], "KW": g["kw"], "SH": g["sh"], "SW": g["sw"],
            "PH": g["ph"], "PW": g["pw"], "DH": g["dh"], "DW": g["dw"], "OH": g["oh"], "OW": g["ow"],
            "COUT": g["cout"], "TAPS": self.taps, "A_FLOAT": a_float, "DOT": self.dot, "BORDER": self.border,
            "Q0": 0 if op.q0 is None else (2 if op.q0.dtype == "fp8" else 1),
            "RES": 0 if op.res is None else (1 if op.res[1] is not None else 2),
            "ACT": 0 if op.act is None else (1 if op.act[1] == float("inf") else 2),
            "OUT": 0 if op.out_grid is None else (1 if op.out2 is None else (3 if op.store1 else 2)),
            "Q1_F8": _is_fp8(op.out_grid), "Q2_F8": _is_fp8(op.out2_grid), "NP": self.np, **sc_consts,
        }  # fmt: skip
        if not a_float:  # 8-bit NHWC (the input itself, or this runner's own quantized copy of a float input)
            n, c, h, w = _nhwc_strides(plan.tensors[op.x].shape)
            self.consts.update(XSN=n, XSC=c, XSH=h, XSW=w)
        n, c, h, w = (0, 0, 0, 0)
        if op.res is not None and op.res[1] is not None:
            n, c, h, w = _nhwc_strides(plan.tensors[op.res[0]].shape)
        self.consts.update(RSN=n, RSC=c, RSH=h, RSW=w)
        grid0, res_grid, g1, g2 = op.q0, (op.res[1] if op.res else None), op.out_grid, op.out2_grid
        act = op.act or (0.0, 0.0)
        self.scalars = {
            "a_scale": op.grid.scale if op.grid else 1.0, "a_zp": float(op.grid.zp) if op.grid else 0.0,
            "a_zpi": op.grid.zp if op.grid else 0, "a2_zpi": op.sc.grid.zp if op.sc else 0,
            "a_f8": 1.0 / op.grid.scale if op.mode == "fp8" else 1.0,  # fp8 quantize-on-load: x * (1/s)
            "g0_scale": grid0.scale if grid0 else 1.0, "g0_zp": float(grid0.zp) if grid0 else 0.0,
            "res_scale": res_grid.scale if res_grid else 1.0, "res_zp": float(res_grid.zp) if res_grid else 0.0,
            "lo": float(act[0]), "hi": float(min(act[1], 3.0e38)),
            "g1_scale": g1.scale if g1 else 1.0, "g1_zp": float(g1.zp) if g1 else 0.0,
            "g2_scale": g2.scale if g2 else 1.0, "g2_zp": float(g2.zp) if g2 else 0.0,
        }  # fmt: skip
        self.out_shape = _storage_shape(plan.tensors[op.out].shape) if op.out_grid else None

    def _vec(self, v, dtype) -> torch.Tensor:  # [NP], zero padded
        out = torch.zeros(self.np, dtype=dtype)
        out[: len(v)] = torch.as_tensor(np.asarray(v), dtype=torch.float64).to(dtype)
        return out.to(self.device)

    def _pack(self, w: np.ndarray, g: dict, taps: bool, dtype) -> torch.Tensor:
        """[Cout, Cin, KH, KW] -> B as [NP, KP] (K contiguous): k = tap * Cin_pad + c (taps) or tap * Cin + c."""
        bk = self.config.bk
        t = torch.from_numpy(np.ascontiguousarray(w)).to(torch.float32).permute(0, 2, 3, 1)  # [Cout, KH, KW, Cin]
        cout, kh, kw, cin = t.shape
        if taps:
            cin_pad = -(-cin // bk) * bk
            t = torch.nn.functional.pad(t, (0, cin_pad - cin)).reshape(cout, kh * kw * cin_pad)
        else:
            t = t.reshape(cout, kh * kw * cin)
            t = torch.nn.functional.pad(t, (0, -(-t.shape[1] // bk) * bk - t.shape[1]))
        t = torch.nn.functional.pad(t, (0, 0, 0, self.np - cout))
        return t.to(self.device).to(dtype).contiguous()

    def __call__(self, env: dict) -> None:
        self._launch(env, warmup=False)

    def warmup(self, batch: int, float_strides: dict) -> None:
        """Compile this layer's kernel for ``batch`` without running it (inputs are uninitialized buffers;
        ``float_strides``: the (n, c, h, w) strides of each float input, as :func:`static_float_strides`)."""
        self._launch(self._empty_inputs(batch, float_strides), warmup=True)

    def kernel_arguments(self, batch: int, float_strides: dict) -> tuple[dict, dict, int]:
        """(tensor and scalar arguments, compile-time constants, output rows) of this layer's ``conv_kernel``
        launch for ``batch``, on uninitialized inputs: what an ahead-of-time compile needs (.compile)."""
        return self._launch(self._empty_inputs(batch, float_strides), warmup=True, launch=False)

    def _empty_inputs(self, batch: int, float_strides: dict) -> dict:
        op, dev = self.op, self.device
        env = {}
        for tid in (op.x, op.res[0] if op.res else None, op.sc.x if op.sc else None):
            if tid is None:
                continue
            info = self.plan.tensors[tid]
            if info.dtype in STORED:
                env[tid] = torch.empty((batch, *_storage_shape(info.shape)), device=dev, dtype=STORED[info.dtype])
            else:
                shape = (batch, *info.shape)
                n, c, h, w = float_strides[tid]
                strides = (n, c, h, w)[: len(shape)] if len(shape) == 4 else ((n, c, w) if len(shape) == 3 else (n, c))
                dtype = torch.float16 if info.dtype == "fp16" else torch.float32
                env[tid] = torch.empty_strided(shape, strides, device=dev, dtype=dtype)
        return env

    def _launch(self, env: dict, warmup: bool, launch: bool = True):
        k = _kernels()
        op, consts = self.op, dict(self.consts)
        x = env[op.x]
        batch = x.shape[0]
        if self.prequant:  # quantize the float input to int8 NHWC first (a pass of its own)
            info = self.plan.tensors[op.x]
            q = torch.empty((batch, *_storage_shape(info.shape)), device=x.device, dtype=torch.int8)
            n, c, h, w = _float_strides(x)
            pixels = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
            qconsts = {"C": x.shape[1], "XSN": n, "XSC": c, "XSP": w if x.dim() > 2 else 0, "P": pixels}
            if x.dim() == 4 and h != w * x.shape[3] and x.shape[2] > 1:
                raise EngineError(f"layer {op.node!r}: input strides {tuple(x.stride())} cannot be flattened")
            if not warmup:
                k.launch_quantize(x, q, batch * pixels, op.grid.scale, float(op.grid.zp), qconsts)
            x = q
        elif op.x_float:
            n, c, h, w = _float_strides(x)
            consts.update(XSN=n, XSC=c, XSH=h, XSW=w)
        res = self.dummy
        if op.res is not None:
            res = env[op.res[0]]
            if op.res[1] is None:
                n, c, h, w = _float_strides(res)
                consts.update(RSN=n, RSC=c, RSH=h, RSW=w)
        g = op.geometry
        m = batch * g["oh"] * g["ow"]
        if op.out_grid is not None:
            shape = (batch, *self.out_shape)
            out = self.buffer(env, op.out, shape, STORED[op.out_grid.dtype], x.device) if op.store1 else None
            out2 = None
            if op.out2 is not None:
                out2 = self.buffer(env, op.out2, shape, STORED[op.out2_grid.dtype], x.device)
        else:
            dtype = torch.float16 if op.out_dtype == "fp16" else torch.float32
            out = self.buffer(env, op.out, (batch, g["oh"], g["ow"], g["cout"]), dtype, x.device)
            out2 = None
        args = {
            "x_ptr": x, "w_ptr": self.w, "wsum_ptr": self.wsum, "wtap_ptr": self.wtap, "scale_ptr": self.scale,
            "bias_ptr": self.bias,
            "x2_ptr": env[op.sc.x] if op.sc else self.dummy, "w2_ptr": self.w2 if op.sc else self.dummy,
            "wsum2_ptr": self.wsum2 if op.sc else self.wsum, "scale2_ptr": self.scale2 if op.sc else self.scale,
            "res_ptr": res, "out_ptr": out if out is not None else out2, "out2_ptr": out2 if out2 is not None else out,
            **self.scalars,
        }  # fmt: skip
        if not launch:
            return args, consts, m
        k.launch_conv(args, consts, self.config, m, warmup)
        if warmup:
            return
        if op.out_grid is None:
            env[op.out] = _logical_float(out, self.plan.tensors[op.out].shape)
        else:
            if out is not None:
                env[op.out] = out
            if out2 is not None:
                env[op.out2] = out2

    def describe(self) -> str:
        op, g = self.op, self.op.geometry
        parts = [f"{g['kh']}x{g['kw']}/s{g['sh']}" if g["kh"] * g["kw"] > 1 or g["sh"] > 1 else "1x1"]
        if op.sc is not None:
            parts.append("+shortcut gemm")
        if op.q0 is not None:
            parts.append("+fq")
        if op.res is not None:
            parts.append(f"+residual({op.res[1].dtype})" if op.res[1] is not None else "+residual(float)")
        if op.act is not None:
            parts.append("+relu" if op.act[1] == float("inf") else "+clip")
        outs = [g.dtype for g in (op.out_grid if op.store1 else None, op.out2_grid) if g is not None]
        parts.append("->" + ("+".join(outs) if op.out_grid is not None else op.out_dtype))
        if self.prequant:
            parts.insert(0, "quantize pass +")
        elif op.x_float and op.mode in ("int8", "fp8"):
            parts.insert(0, "quantize-on-load")
        math = {0: "int8 tensor cores", 3: "fp8 tensor cores", 4: "int8 on fp16 tensor cores", 5: "int8 on CUDA cores",
                6: "fp8 tensor cores (fp32 accumulation)"}  # fmt: skip
        math = math.get(self.dot, op.mode)
        return f"triton conv {op.mode} [{' '.join(parts)}] {math} {self.config}"


def static_float_strides(plan, tid: int) -> tuple[int, int, int, int] | None:
    """(n, c, h, w) strides a float tensor will have, known before running: the network input (contiguous
    NCHW) and float outputs of the Triton kernels (NHWC storage); None for tensors torch produces."""
    shape = plan.tensors[tid].shape
    if tid == 0:  # logical (C, H, W), (C, L) or (F,), contiguous
        if len(shape) == 3:
            c, h, w = shape
            return c * h * w, h * w, w, 1
        if len(shape) == 2:
            return shape[0] * shape[1], shape[1], 0, 1
        return shape[0], 1, 0, 0
    producer = next((op for op in plan.ops if op.out == tid), None)
    if producer is None or producer.kind not in ("conv", "pool"):
        return None
    if len(shape) == 3:
        c, h, w = shape
        return h * w * c, 1, w * c, c
    if len(shape) == 2:
        c, length = shape
        return length * c, 1, 0, c
    return shape[0], 1, 0, 0


def _logical_float(out: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A [N, OH, OW, C] float kernel output as a tensor of the logical shape (channels-last strides)."""
    if len(shape) == 3:
        return out.permute(0, 3, 1, 2)
    if len(shape) == 2:
        return out.reshape(out.shape[0], shape[1], shape[0]).permute(0, 2, 1)
    return out.reshape(out.shape[0], -1)


class PoolRunner(_Runner):
    def __init__(self, op, plan, device):
        self.op, self.plan = op, plan
        g = op.geometry
        self.consts = {
            "H": g["h"], "W": g["w"], "C": g["c"], "KH": g["kh"], "KW": g["kw"], "SH": g["sh"], "SW": g["sw"],
            "PH": g["ph"], "PW": g["pw"], "OH": g["oh"], "OW": g["ow"], "IS_MAX": op.is_max,
            "COUNT_PAD": g["count_pad"], "OUT": 0 if op.out_grid is None else 1,
        }  # fmt: skip
        if op.is_max and op.out_grid is not None and op.out_grid == op.grid:
            self.consts["OUT"] = 0  # the stored maximum itself
        out = op.out_grid or op.grid
        self.scalars = {"in_scale": op.grid.scale, "in_zp": float(op.grid.zp), "out_scale": out.scale,
                        "out_zp": float(out.zp)}  # fmt: skip

    def __call__(self, env):
        op, g = self.op, self.op.geometry
        x = env[op.x]
        batch = x.shape[0]
        dtype = STORED[op.out_grid.dtype] if op.out_grid is not None else torch.float32
        out = self.buffer(env, op.out, (batch, g["oh"], g["ow"], g["c"]), dtype, x.device)
        _kernels().launch_pool(x, out, batch * g["oh"] * g["ow"], self.scalars, self.consts)
        info = self.plan.tensors[op.out]
        env[op.out] = out if op.out_grid is not None else _logical_float(out, info.shape)

    def describe(self) -> str:
        g = self.op.geometry
        kind = "max" if self.op.is_max else "avg"
        out = self.op.out_grid.dtype if self.op.out_grid is not None else "fp32"
        return f"triton {kind}pool {self.op.grid.dtype} {g['kh']}x{g['kw']}/s{g['sh']} ->{out}"


class RequantRunner(_Runner):
    def __init__(self, op, plan, device):
        self.op = op
        lo = -3.0e38 if op.lo is None else float(op.lo)  # None: no clamp
        self.scalars = {"in_scale": op.grid.scale, "in_zp": float(op.grid.zp), "out_scale": op.out_grid.scale,
                        "out_zp": float(op.out_grid.zp), "lo": lo}  # fmt: skip

    def __call__(self, env):
        x = env[self.op.x]
        out = self.buffer(env, self.op.out, tuple(x.shape), STORED[self.op.out_grid.dtype], x.device)
        _kernels().launch_requant(x, out, self.scalars)
        env[self.op.out] = out

    def describe(self) -> str:
        relu = self.op.lo is not None and self.op.lo > -128
        return f"triton requant {self.op.grid.dtype}->{self.op.out_grid.dtype}" + (" +relu" if relu else "")


class QuantizeRunner(_Runner):
    def __init__(self, op, plan, device):
        self.op, self.plan = op, plan
        self.shape = plan.tensors[op.out].shape

    def __call__(self, env):
        x = env[self.op.x]
        batch = x.shape[0]
        n, c, h, w = _float_strides(x)
        if x.dim() == 4 and h != w * x.shape[3] and x.shape[2] > 1:
            x = x.contiguous()
            n, c, h, w = _float_strides(x)
        channels = x.shape[1]
        pixels = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
        dtype = STORED[self.op.out_grid.dtype]
        out = self.buffer(env, self.op.out, (batch, *_storage_shape(self.shape)), dtype, x.device)
        consts = {"C": channels, "XSN": n, "XSC": c, "XSP": w if x.dim() > 2 else 0, "P": pixels}
        g = self.op.out_grid
        _kernels().launch_quantize(x, out, batch * pixels, g.scale, float(g.zp), consts)
        env[self.op.out] = out

    def describe(self) -> str:
        return f"triton quantize ->{self.op.out_grid.dtype} nhwc"


class TorchRunner(_Runner):
    def __init__(self, op, plan, device):
        from .torch_ops import dequantize_nhwc, run_torch_op

        self.op, self.plan = op, plan
        self.run_op, self.dequantize = run_torch_op, dequantize_nhwc
        self.half = op.dtype == "fp16"
        perm = plan.tensors[op.inputs[0]].perm if op.op == "Dequantize" else None
        self.perm = None if perm is None else torch.as_tensor(perm, device=device)  # no copies inside a graph
        # Operand constants (weights, BatchNorm parameters) move to the device once; shape-like constants
        # (Reshape's shape, Clip's bounds) stay numpy, read on the host.
        host = op.op in ("Reshape", "Squeeze", "Unsqueeze", "Clip")
        self.consts = [self._const(i, device) if isinstance(i, np.ndarray) and not host else None for i in op.inputs]

    def _const(self, v: np.ndarray, device):
        t = torch.from_numpy(np.array(v)).to(device)  # a copy: constants from onnx are read-only
        if t.is_floating_point():
            t = t.to(torch.float16 if self.half else torch.float32)
        return t

    def __call__(self, env):
        op = self.op
        if op.op == "Dequantize":
            src = op.inputs[0]
            info = self.plan.tensors[src]
            base = env[src]
            env[op.out] = self.dequantize(base.reshape(base.shape[0], -1) if len(info.shape) == 1 else base,
                                          info.shape, op.grid.scale, op.grid.zp, self.perm)  # fmt: skip
            return
        args = []
        for i, c in zip(op.inputs, self.consts, strict=True):
            if c is not None:
                args.append(c)
            elif isinstance(i, int):
                t = env[i]
                if t.is_floating_point():
                    t = t.half() if self.half else t.float()
                args.append(t)
            else:
                args.append(i)
        env[op.out] = self.run_op(op.op, args, op.attrs)

    def describe(self) -> str:
        return f"torch {self.op.op} {self.op.dtype}" if self.op.op != "Dequantize" else "torch dequantize"


# ------------------------------------------------------------------------------------------ engine


@dataclass
class _Graph:
    """One captured batch size: the graph reads ``x`` and writes ``out`` (static buffers) and ``finite`` (the
    input had no NaN/inf, computed inside the graph, so checking it costs no launch and no extra sync).
    ``staging``: the pinned host buffer CPU inputs go through (made on first use); ``staged`` records when its
    copy to the device finished, so the next call does not overwrite it while the copy is in flight."""

    graph: object
    x: torch.Tensor
    out: torch.Tensor
    finite: torch.Tensor
    staging: torch.Tensor | None = None
    staged: object = None


def _device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - the engine cannot exist without triton
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = "none (Triton interpreter on the CPU)"
    return info


class CudaEngine(Engine):
    backend = "cuda"

    def __init__(self, qdq_bytes: bytes, input_shape, layers: dict, kernels: dict | None, device, opt_batch: int,
                 calibration_data=()):  # fmt: skip
        """``kernels``: stored tile configs ``{"configs": {node: config}}`` from an engine file, or None to
        tune them here (on a GPU; the CPU interpreter takes the default configs)."""
        import onnx

        from .lower import lower

        super().__init__(input_shape, layers, max_batch=None)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N": inputs compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.qdq_bytes = qdq_bytes
        try:
            self.plan = lower(onnx.load_from_string(qdq_bytes), layers)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"the cuda backend could not lower the Q/DQ model: {type(e).__name__}: {e}") from e
        fp8 = next((op.node for op in self.plan.ops if getattr(op, "mode", None) == "fp8"), None)
        check_fp8_support(None if fp8 is None else f"node {fp8!r}", self.device)  # before any compiling
        self._views: dict[int, list[int]] = {}
        for view, base in self.plan.aliases.items():
            self._views.setdefault(base, []).append(view)
        self._lock = threading.Lock()
        self._graphs: OrderedDict[int, _Graph] = OrderedDict()
        stored = (kernels or {}).get("configs", {})
        tune = kernels is None and self.device.type == "cuda"
        self.tuning: dict[str, dict] = {}
        self.runners = self._make_runners(stored, tune, opt_batch, calibration_data)
        self.build_info = (kernels or {}).get("build") or {**_device_info(self.device), "tuned_at_batch": opt_batch}

    # ---------------------------------------------------------------- building
    def _precompile(self, stored: dict, tune: bool, batch: int) -> None:
        """Compile every conv kernel the build will use in parallel worker processes (see .compile)."""
        from .compile import precompile

        k = _kernels()
        jobs = []
        for op in self.plan.ops:
            if op.kind != "conv":
                continue
            floats = [t for t in (op.x, op.res[0] if op.res else None) if t is not None]
            floats = [t for t in floats if self.plan.tensors[t].dtype not in STORED]
            strides = {t: static_float_strides(self.plan, t) for t in floats}
            if any(v is None for v in strides.values()):
                continue  # an input torch produces: its strides are known only when it runs
            if op.node in stored:
                configs = [k.KernelConfig.from_dict(stored[op.node])]
            else:
                configs = candidate_configs(op) if tune else [default_config(op)]
            jobs += [(op, c, strides) for c in configs]
        if jobs:
            precompile(jobs, self.plan.tensors, batch)

    def _make_runners(self, stored: dict, tune: bool, opt_batch: int, samples) -> list:
        k = _kernels()
        runners = []
        env = {}
        if self.device.type == "cuda":
            self._precompile(stored, tune, opt_batch)
        if tune:
            env[0] = self._sample_input(opt_batch, samples)
        cache: dict[tuple, object] = {}
        for op in self.plan.ops:
            if op.kind == "conv":
                if op.node in stored:
                    config = k.KernelConfig.from_dict(stored[op.node])
                elif tune:
                    config = self._tune(op, env, cache)
                else:
                    config = default_config(op)
                runner = ConvRunner(op, self.plan, self.device, config)
            else:
                runner = {"pool": PoolRunner, "requant": RequantRunner, "quantize": QuantizeRunner,
                          "torch": TorchRunner}[op.kind](op, self.plan, self.device)  # fmt: skip
            if tune:
                with torch.no_grad(), _no_tf32():
                    self._step(runner, env)
            runners.append(runner)
        return runners

    def _sample_input(self, batch: int, samples) -> torch.Tensor:
        rows = [torch.as_tensor(np.asarray(s, np.float32)) for s in samples] if samples else []
        x = torch.cat(rows)[:batch] if rows else torch.empty(0)
        if x.shape[0] < batch:  # fresh normal values where the sample data runs out (never zeros)
            extra = torch.randn(batch - x.shape[0], *self.input_shape[1:])
            x = torch.cat([x.reshape(-1, *self.input_shape[1:]), extra])
        return x.reshape(batch, *self.input_shape[1:]).to(self.device)

    def _tune(self, op, env: dict, cache: dict):
        """The fastest candidate config for this layer at the tuning batch (:func:`time_in_graph`: GPU time
        only, so host launch overhead does not decide between small kernels); layers of the same shape share
        the result (same epilogue too: a residual changed the best tile of ResNet-18's layer1, gpu-notes.md note 7)."""
        key = (op.mode, op.x_float, op.sc is not None, tuple(sorted(op.geometry.items())), _epilogue(op))
        if key in cache:
            return cache[key]
        timings = {}
        for config in candidate_configs(op):
            try:
                runner = ConvRunner(op, self.plan, self.device, config)
                scratch = dict(env)
                with torch.no_grad():
                    runner(scratch)  # compile
                    us = time_in_graph(lambda r=runner, e=scratch: r(e), runs=10, repeats=3)
            except Exception as e:  # a config the compiler rejects (shared memory, registers): skip it
                timings[str(config)] = f"failed: {type(e).__name__}"
                continue
            timings[str(config)] = round(float(us), 2)
        ok = {c: t for c, t in timings.items() if isinstance(t, float)}
        if not ok:
            raise EngineError(f"layer {op.node!r}: no kernel config compiled on this GPU: {timings}")
        best = min(ok, key=ok.get)
        config = next(c for c in candidate_configs(op) if str(c) == best)
        self.tuning[op.node] = {"us": timings, "chosen": best}
        cache[key] = config
        return config

    # ---------------------------------------------------------------- running
    def _step(self, runner, env: dict) -> None:
        """Run one op, then publish the flattened views of what it wrote (same storage, [N, F])."""
        runner(env)
        for tid in runner.outputs():
            for view in self._views.get(tid, ()):
                env[view] = env[tid].reshape(env[tid].shape[0], -1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {0: x}
        for runner in self.runners:
            self._step(runner, env)
        return env[self.plan.output]

    def _graph(self, batch: int) -> _Graph:
        g = self._graphs.get(batch)
        if g is not None:
            self._graphs.move_to_end(batch)
            return g
        x = torch.randn(batch, *self.input_shape[1:], device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad(), _no_tf32():
            for _ in range(2):  # compile every kernel for these shapes, and warm the allocator
                self._forward(x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), _no_tf32():
            finite = torch.isfinite(x).all()
            out = self._forward(x)
        g = _Graph(graph, x, out, finite)
        self._graphs[batch] = g
        if len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return g

    def _stage(self, g: _Graph, x: torch.Tensor) -> None:
        """Copy a host input into the graph's input buffer through pinned memory (asynchronously)."""
        if g.staging is None:
            g.staging = torch.empty(g.x.shape, dtype=g.x.dtype, pin_memory=True)
            g.staged = torch.cuda.Event()
        else:
            g.staged.synchronize()  # the previous call's copy out of the staging buffer has finished
        g.staging.copy_(x)
        g.x.copy_(g.staging, non_blocking=True)
        g.staged.record()

    def run_device(self, x, check_finite: bool = True) -> torch.Tensor:
        """Run on the engine's device and return the output there (a CUDA tensor on a GPU). On a GPU this
        replays the batch size's CUDA graph (captured on first use): an input already on the engine's GPU is
        copied device-to-device into the graph's input buffer (no host round trip), a CPU input through a
        pinned staging buffer. ``check_finite`` reads the graph's own finiteness flag after the replay (one
        synchronization, which a caller reading the output needs anyway); without it nothing waits for the GPU."""
        if self.device.type != "cuda":
            x = self.check_input(x, check_finite).to(self.device)
            with torch.no_grad():
                return self._forward(x).clone()
        x = self.check_input(x, check_finite=False)
        with self._lock:
            g = self._graph(x.shape[0])
            if x.device == self.device:
                g.x.copy_(x)
            elif x.device.type == "cpu":
                self._stage(g, x)
            else:
                g.x.copy_(x.to(self.device))
            g.graph.replay()
            out = g.out.clone()
            if check_finite and not bool(g.finite):
                raise EngineError("input contains NaN or infinite values")
        return out

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        """float32 output: on the engine's GPU for an input already there (nothing copied back to the host),
        else a CPU tensor."""
        out = self.run_device(x, check_finite).float()
        if isinstance(x, torch.Tensor) and x.device == self.device:
            return out
        return out.cpu()

    # ---------------------------------------------------------------- report
    def _op_layer(self, op) -> str | None:
        return layer_of_node(op.node, self.layers)

    def placement(self) -> list[LayerPlacement]:
        kernels: dict[str, list[str]] = {}
        precisions: dict[str, set[str]] = {}
        gemms: dict[str, str] = {}  # layer -> the precision its conv/linear kernel runs in
        fused_into: dict[str, str] = {}
        acc32: set[str] = set()  # layers whose fp8 GEMM accumulates in fp32
        for runner in self.runners:
            op = runner.op
            owner = self._op_layer(op)
            if owner is None:
                continue
            if isinstance(runner, ConvRunner) and runner.dot == _kernels().DOT_FP8_ACC32:
                acc32.add(owner)
            kernels.setdefault(owner, []).append(runner.describe())
            precisions.setdefault(owner, set()).add(_runs_as(runner))
            if isinstance(runner, ConvRunner) or (isinstance(runner, TorchRunner) and op.op in _GEMM_OPS):
                gemms.setdefault(owner, _runs_as(runner))
            for node in op.absorbed:
                other = layer_of_node(node, self.layers)
                if other is not None and other != owner:
                    fused_into.setdefault(other, owner)
        rows = []
        for layer, info in self.layers.items():
            requested = info["precision"]
            ks = tuple(kernels.get(layer, ()))
            p = precisions.get(layer, set())
            if ks:
                runs_as = gemms.get(layer) or next((r for r in ("int8", "fp8", "fp16", "fp32") if r in p), "fp32")
                note = _note(info, runs_as, self.plan.notes.get(layer), layer in acc32)
            elif layer in fused_into:
                runs_as, note = "fused", f"no kernel of its own: fused into {fused_into[layer]}"
            else:
                runs_as, note = "fused", "no kernel of its own (folded at export or a no-op here)"
            rows.append(LayerPlacement(layer, info["op_type"], requested, runs_as, ks, 0, note))
        return rows

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        """Per-layer time: each op captured ``runs`` times in a row in one CUDA graph, replayed between CUDA
        events (no launch gaps), the median of 5 replays divided by ``runs``; ops outside every layer are
        ``(glue)``. On the CPU interpreter: wall time of each op."""
        x = self.check_input(x).to(self.device)
        env = {0: x}
        per_op = []
        with torch.no_grad(), _no_tf32():
            for runner in self.runners:
                per_op.append(self._time_op(runner, env, max(1, int(runs))))
        totals: dict[str, float] = {}
        names: dict[str, set[str]] = {}
        for runner, us in zip(self.runners, per_op, strict=True):
            layer = self._op_layer(runner.op) or "(glue)"
            totals[layer] = totals.get(layer, 0.0) + us
            names.setdefault(layer, set()).add(runner.describe().split(" [")[0])
        rows = [LayerTime(k, v, tuple(sorted(names[k]))) for k, v in totals.items()]
        return sorted(rows, key=lambda r: -r.microseconds)

    def _time_op(self, runner, env: dict, runs: int) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            self._step(runner, env)
            return (time.perf_counter() - start) * 1e6
        self._step(runner, env)  # compile and produce the input of the next op
        scratch = dict(env)
        return time_in_graph(lambda: runner(scratch), runs)

    def members(self) -> dict[str, bytes]:
        configs = {r.op.node: r.config.to_dict() for r in self.runners if isinstance(r, ConvRunner)}
        kernels = {"configs": configs, "build": self.build_info, "tuning": self.tuning}
        return {"model.onnx": self.qdq_bytes, KERNELS_MEMBER: json.dumps(kernels, indent=1).encode()}


_GEMM_OPS = ("Conv", "Gemm", "MatMul")


def _runs_as(runner) -> str:
    if isinstance(runner, ConvRunner):
        return runner.op.mode
    if isinstance(runner, PoolRunner | RequantRunner | QuantizeRunner):
        grid = runner.op.out_grid or runner.op.grid
        return grid.dtype
    if runner.op.op == "Dequantize":
        return "glue"
    return runner.op.dtype


# benchmarks/results/fp8-accumulation-h100.log
FP8_ACCUMULATION_NOTE = (
    "fp8 tensor cores accumulate with reduced precision (about 11 bits measured on an H100), so sums can differ "
    "from the fp32 fake-quant model's"
)
FP8_ACC32_NOTE = (
    "fp8 tensor cores, each BK-long chunk's sum added to an fp32 accumulator (the tensor cores alone keep about "
    "11 bits over the whole reduction)"
)


def _note(info: dict, runs_as: str, why_not_fp8: str | None = None, fp8_acc32: bool = False) -> str:
    """The placement report's note for a layer; ``why_not_fp8``: the lowering's reason (``Plan.notes``)."""
    requested = info["precision"]
    if requested == "int8" and runs_as == "fp32":
        if info.get("float_bias"):
            return "asked int8, runs float: its bias does not fit int32 steps (an output channel with all-zero weights)"
        return (
            "asked int8, runs float: the config does not quantize both its input and weight (or the op/pattern "
            "has no int8 kernel here)"
        )
    if requested == "fp8" and runs_as != "fp8":
        why = why_not_fp8 or "its input and weight do not both come through fp8 (FLOAT8E4M3FN) DequantizeLinear"
        return f"asked fp8, runs {runs_as}: {why}"
    if runs_as == "fp8":
        return FP8_ACC32_NOTE if fp8_acc32 else FP8_ACCUMULATION_NOTE
    return ""


def _epilogue(op) -> tuple:
    """What a conv's epilogue reads and writes, beyond its geometry: fake-quant, residual and output kinds."""
    res = None if op.res is None else (op.res[1].dtype if op.res[1] is not None else "float")
    grids = (op.q0, op.out_grid if op.store1 else None, op.out2_grid)
    return (res, op.act is not None, *(None if g is None else g.dtype for g in grids), op.out_dtype)


def time_in_graph(fn, runs: int, repeats: int = 5) -> float:
    """Microseconds per call of ``fn`` (GPU work only): ``runs`` calls captured in one CUDA graph, the graph
    replayed ``repeats`` times between CUDA events, the median divided by ``runs``. ``fn`` must have run once
    already (compiled)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(runs):
            fn()
    graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / runs)
    return statistics.median(samples)


@contextlib.contextmanager
def _no_tf32():
    """Float layers run in true fp32 (torch's convs and matmuls would otherwise use TF32 on Ampere and newer)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def build_engine(qdq, input_shape, options: BuildOptions, device="cuda") -> CudaEngine:
    """Build a CUDA engine (``device="cpu"`` runs the same kernels through Triton's interpreter; set
    ``TRITON_INTERPRET=1`` before Triton is imported: for tests only)."""
    batch = max(1, options.opt_batch)  # no max batch here: every batch size gets its own CUDA graph
    return CudaEngine(qdq.model.SerializeToString(), tuple(input_shape), qdq.layers, None, device, batch,
                      options.calibration_data)  # fmt: skip


class CudaBackend(Backend):
    name = "cuda"
    package = "triton"
    device = "cuda"
    precisions = frozenset({"fp32", "fp16", "int8", "fp8"})

    def is_available(self) -> bool:
        return super().is_available() and torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        if not super().is_available():
            return "backend 'cuda' needs Triton and a CUDA GPU (pip install 'mixq[cuda]')"
        return "backend 'cuda' needs a CUDA GPU (torch.cuda.is_available() is False here)"

    def build(self, qdq, input_shape, options: BuildOptions) -> CudaEngine:
        return build_engine(qdq, input_shape, options, "cuda")

    def strongest_float(self, model, input_shape, layers: dict, options: BuildOptions) -> Engine:
        """``auto``'s float reference on this GPU: the torch model in fp16 channels-last, compiled and
        CUDA-graphed (:class:`.torch_float.TorchFloatEngine`)."""
        from .torch_float import TorchFloatEngine

        try:
            return TorchFloatEngine(model, input_shape, layers, max(1, options.opt_batch))
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"torch fp16 float engine: {type(e).__name__}: {e}") from e

    def load(self, path: str | os.PathLike, device="cuda") -> CudaEngine:
        manifest, members = read_engine_file(path, self.name)
        try:
            kernels = json.loads(members[KERNELS_MEMBER])
            return CudaEngine(members["model.onnx"], tuple(manifest["input_shape"]), manifest["layers"], kernels,
                              device, 1)  # fmt: skip
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise EngineError(f"{path}: engine manifest or members are incomplete ({type(e).__name__}: {e})") from e


register_backend("cuda", CudaBackend)
