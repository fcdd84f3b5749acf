"""The cuda engine's runners: per conv/linear layer the tile configs worth timing and the :class:`ConvRunner`
that launches the fused Triton kernel (:mod:`.kernels`), and the runners of pools, requantization, quantize
and the ops torch runs. Both the engine (:mod:`.engine`) and the compile workers (:mod:`.compile`) import
them from here, so neither imports the other."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..base import EngineError
from .lower import has_border

__all__ = [
    "STORED", "ConvRunner", "PoolRunner", "QuantizeRunner", "RequantRunner", "TorchRunner", "border_table",
    "candidate_configs", "default_config", "fp8_accumulation", "static_float_strides",
]  # fmt: skip


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


def quantize_to_storage(x: torch.Tensor, out: torch.Tensor, grid) -> torch.Tensor:
    """Quantize the float tensor ``x`` (logical [N, C, ...], any strides) onto ``grid`` into ``out``, its 8-bit
    NHWC storage (the Triton quantize kernel); returns ``out``."""
    n, c, h, w = _float_strides(x)
    if x.dim() == 4 and h != w * x.shape[3] and x.shape[2] > 1:
        x = x.contiguous()
        n, c, h, w = _float_strides(x)
    pixels = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
    consts = {"C": x.shape[1], "XSN": n, "XSC": c, "XSP": w if x.dim() > 2 else 0, "P": pixels}
    _kernels().launch_quantize(x, out, x.shape[0] * pixels, grid.scale, float(grid.zp), consts)
    return out


class QuantizeRunner(_Runner):
    def __init__(self, op, plan, device):
        self.op, self.plan = op, plan
        self.shape = plan.tensors[op.out].shape

    def __call__(self, env):
        x = env[self.op.x]
        g = self.op.out_grid
        out = self.buffer(env, self.op.out, (x.shape[0], *_storage_shape(self.shape)), STORED[g.dtype], x.device)
        env[self.op.out] = quantize_to_storage(x, out, g)

    def describe(self) -> str:
        return f"triton quantize ->{self.op.out_grid.dtype} nhwc"


class TorchRunner(_Runner):
    def __init__(self, op, plan, device):
        from .torch_ops import HOST_CONSTANT_OPS, dequantize_nhwc, run_torch_op

        self.op, self.plan = op, plan
        self.run_op, self.dequantize = run_torch_op, dequantize_nhwc
        self.half = op.dtype == "fp16"
        perm = plan.tensors[op.inputs[0]].perm if op.op == "Dequantize" else None
        self.perm = None if perm is None else torch.as_tensor(perm, device=device)  # no copies inside a graph
        # Operand constants (weights, BatchNorm parameters) move to the device once; shape-like constants
        # (Reshape's shape, Clip's bounds) stay numpy, read on the host.
        host = op.op in HOST_CONSTANT_OPS
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
