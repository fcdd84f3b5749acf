"""The ``cuda`` backend's legalization: the backend-neutral Q/DQ ONNX graph -> a list of fused ops.

No Triton here (numpy, onnx, and torch for float shapes), so it is tested on any machine. Each ONNX node is interpreted
symbolically in graph order; what a value *is* decides what runs:

- ``QuantV``: an int8 tensor (NHWC, stored form: every 8-bit grid spans [-128, 127], see :class:`Grid`) or an
  fp8 e4m3 one (NHWC, value = stored * scale, see :class:`F8Grid`); ``DQV``: the float value a
  DequantizeLinear of it stands for (nothing runs until a float is needed).
- ``PendingV``: the float output of a conv/linear/average pool whose epilogue is still open: a following
  ReLU/Clip, residual Add (with an int8 or float other side, or the 1x1 shortcut conv as a second GEMM)
  and QuantizeLinear are fused into it, in the order ``[fake-quant] [+residual] [clamp] quantize``.
- A QuantizeLinear of a DQV is a requantization between grids: nothing when the grids map every integer
  to itself, else a second output of the producing kernel or a requant op.
- A QuantizeLinear of a float tensor feeding one int8 conv is done by that conv as it loads its input.
- Everything else runs as a float op (:class:`TorchOp`) on dequantized values, in the layer's precision; ops
  of no layer (the glue) in fp32, or in fp16 where the build asks for it (``lower(..., glue="fp16")``).
- Transformers: a MatMul of a ``(T, K)`` token tensor by a constant ``[K, N]`` weight (a Linear on tokens) is a
  1x1 conv over a ``1 x T`` image, its bias Add fused into the epilogue. Its 8-bit tensors are stored
  ``[N, T, C]`` as they are, which is the Conv1d layout of the transposed ``(C, T)`` tensor: the plan holds them
  in that transposed form (``QuantV.tokens``) and the float ops around them see the model's ``(T, C)`` through a
  Transpose view. Shape arithmetic (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape``/``Expand`` targets) is
  evaluated here at two batch sizes (:class:`ShapeV`): a result that depends on the batch only through the
  leading dimension becomes a per-sample target; one that mixes the batch into other dimensions is an error.

A conv or linear runs int8 when its input and weight come through int8 DequantizeLinear (int8 weights, weight
zero point subtracted when the difference still fits int8); fp8 when both come through FLOAT8E4M3FN
DequantizeLinear (an fp8 activation grid and an fp8 weight initializer, per-channel or per-tensor scale);
fp16 when its layer asks for 16 bits and the weights are float; a float32 layer whose input is int8 or fp8
runs in the same kernel with fp32 (IEEE) operands, its input dequantized as it is loaded; other float32
layers through torch. A layer that asks for fp8 but cannot run fp8 gets a reason in ``Plan.notes``.
"""

# ruff: noqa: N802 - node handlers are named after the ONNX op types they lower (on_QuantizeLinear, ...)
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ...primitives import quantize
from ...spec import IntType
from ..base import GLUE_PRECISIONS, EngineError, constant_values, is_fp8, layer_of_node
from ..onnx_graph import attributes, dequantize_constant

INT8_GRID = IntType(8, True)  # the stored form of every 8-bit grid (see Grid)

__all__ = [
    "Grid",
    "F8Grid",
    "TensorInfo",
    "QConv",
    "QPool",
    "Requant",
    "Quantize",
    "TorchOp",
    "Plan",
    "lower",
    "GLUE_PRECISIONS",
    "has_border",
]

INPUT = 0  # tensor id of the network input


@dataclass(frozen=True)
class Grid:
    """An 8-bit quantization grid in stored form: ``value = (stored - zp) * scale`` with stored in [-128, 127]
    (uint8 grids are stored minus 128, so their zero point is too)."""

    scale: float
    zp: int
    dtype = "int8"  # (class attribute: the stored type of tensors on this grid)

    @staticmethod
    def from_onnx(scale, zero_point) -> Grid | F8Grid:
        zp = np.asarray(zero_point)
        scale = float(np.float32(np.asarray(scale).reshape(-1)[0]))
        if zp.dtype == np.uint8:
            stored = int(zp.reshape(-1)[0]) - 128
        elif zp.dtype == np.int8:
            stored = int(zp.reshape(-1)[0])
        elif is_fp8(zp):
            if np.asarray(zp, np.float32).any():
                raise EngineError("an fp8 activation zero point that is not 0; fp8 grids are symmetric")
            return F8Grid(scale)
        else:
            raise EngineError(
                f"activation zero point of type {zp.dtype}; the cuda backend runs int8, uint8 and float8e4m3fn grids"
            )
        return Grid(scale, stored)

    def quantize(self, v: np.ndarray) -> np.ndarray:
        """Stored integers of float values (round half to even, saturate), as ONNX QuantizeLinear."""
        x = torch.from_numpy(np.ascontiguousarray(v, np.float32))
        q = quantize(x, torch.tensor(np.float32(self.scale)), torch.tensor(int(self.zp)), INT8_GRID)
        return q.numpy().astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return dequantize_constant(q, np.float32(self.scale), np.int64(self.zp))

    def requant_table(self, to: Grid) -> np.ndarray:
        """Stored value on ``to`` of every stored value on this grid (Q(DQ(q)), as the Q/DQ graph computes)."""
        return to.quantize(self.dequantize(np.arange(-128, 128)))

    def same_values(self, to: Grid | F8Grid) -> bool:
        return isinstance(to, Grid) and bool((self.requant_table(to) == np.arange(-128, 128)).all())


@dataclass(frozen=True)
class F8Grid:
    """An fp8 e4m3 grid: ``value = stored * scale`` (stored: ``torch.float8_e4m3fn``, finite range +-448), no
    zero point (``zp`` is 0 so the kernels' int8 formulas reduce to the fp8 ones)."""

    scale: float
    zp = 0
    dtype = "fp8"

    def same_values(self, to: Grid | F8Grid) -> bool:
        return isinstance(to, F8Grid) and np.float32(to.scale) == np.float32(self.scale)


@dataclass
class TensorInfo:
    """One tensor of the plan: ``shape`` per image in the model's (NCHW) terms; 8-bit tensors are stored NHWC
    (``(C, H, W)`` stored as ``[N, H, W, C]``; a flattened one as ``[N, F]`` with ``perm[i]`` the NCHW feature
    index of stored position ``i``)."""

    id: int
    shape: tuple[int, ...]
    dtype: str  # int8 | fp8 | fp32 | fp16 (float tensors are torch tensors of logical NCHW shape, any strides)
    perm: np.ndarray | None = None


@dataclass
class Shortcut:
    """A second GEMM added into a conv's accumulator (a residual block's 1x1 shortcut conv), of the main
    GEMM's kind (int8 or fp8)."""

    node: str
    x: int
    grid: Grid | F8Grid
    weight: np.ndarray  # int8 values, or e4m3 values as float32 [Cout, Cin, KH, KW]
    w_scale: np.ndarray  # [Cout] float64
    bias: np.ndarray  # [Cout] float64
    geometry: dict


@dataclass
class QConv:
    """One conv or linear layer run by the Triton kernel, with its fused epilogue (see .kernels)."""

    kind = "conv"  # (class attributes, not fields: what the engine runs each op with)

    node: str
    mode: str  # int8 | fp8 | fp16 | fp32
    x: int
    x_float: bool  # the input is a float tensor (quantized or converted as it is loaded)
    grid: Grid | F8Grid | None  # the input grid (8-bit input, or quantize-on-load); None for a float input
    weight: np.ndarray  # int8 values (int8 mode), e4m3 values as float32 (fp8 mode) or float [Cout, Cin, KH, KW]
    w_scale: np.ndarray  # [Cout] float64 (1.0 for float weights)
    bias: np.ndarray  # [Cout] float64
    geometry: dict  # cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, cout, oh, ow
    absorbed: list[str] = field(default_factory=list)  # other ONNX nodes fused into this op
    sc: Shortcut | None = None
    q0: Grid | F8Grid | None = None
    res: tuple[int, Grid | F8Grid | None] | None = None  # (tensor, its grid; None = float)
    act: tuple[float, float] | None = None
    out: int | None = None  # None while the epilogue is open
    out_grid: Grid | F8Grid | None = None  # None = float output
    out_dtype: str = "fp32"
    store1: bool = True
    out2: int | None = None
    out2_grid: Grid | F8Grid | None = None


@dataclass
class QPool:
    """Max or average pooling over an int8 or fp8 NHWC tensor (output 8-bit on ``out_grid``, or float)."""

    kind = "pool"

    node: str
    x: int
    grid: Grid | F8Grid
    is_max: bool
    geometry: dict  # c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, count_pad
    absorbed: list[str] = field(default_factory=list)
    out: int | None = None
    out_grid: Grid | F8Grid | None = None


@dataclass
class Requant:
    """8-bit -> 8-bit between grids (int8 or fp8 each), then ``max(q, lo)`` (a ReLU applied to stored values;
    None: no clamp)."""

    kind = "requant"

    node: str
    x: int
    grid: Grid | F8Grid
    out: int
    out_grid: Grid | F8Grid
    lo: float | None = None
    absorbed: list[str] = field(default_factory=list)


@dataclass
class Quantize:
    """A float tensor -> int8 or fp8 NHWC."""

    kind = "quantize"

    node: str
    x: int
    out: int
    out_grid: Grid | F8Grid
    absorbed: list[str] = field(default_factory=list)


@dataclass
class TorchOp:
    """A float op run by torch: ``op`` is the ONNX op type (or ``Dequantize``), ``inputs`` tensor ids or
    constant arrays, ``attrs`` the ONNX attributes, ``dtype`` the compute precision."""

    kind = "torch"

    node: str
    op: str
    inputs: list
    attrs: dict
    out: int
    dtype: str = "fp32"
    grid: Grid | F8Grid | None = None  # Dequantize: the input's grid
    absorbed: list[str] = field(default_factory=list)


@dataclass
class Plan:
    ops: list
    tensors: dict[int, TensorInfo]
    output: int
    input_shape: tuple[int, ...]  # per image
    aliases: dict[int, int] = field(default_factory=dict)  # flattened view -> the 8-bit tensor it reshapes
    notes: dict[str, str] = field(default_factory=dict)  # layer asking fp8 -> why it does not run fp8


# ---------------------------------------------------------------------------------------------- values


@dataclass
class QuantV:
    tid: int | None  # None: not materialized yet (a quantize of ``lazy`` that a conv may do on load)
    grid: Grid | F8Grid
    shape: tuple[int, ...]  # the model's shape (a token tensor: (T, C))
    name: str  # the ONNX tensor holding the QuantizeLinear output
    lazy: int | None = None  # float tensor to quantize
    tokens: bool = False  # the plan tensor holds the transposed (C, T) of this (T, C) value (see the module doc)


@dataclass
class DQV:
    q: QuantV
    name: str


@dataclass
class PendingV:
    op: QConv | QPool
    shape: tuple[int, ...]
    name: str


@dataclass
class FloatV:
    tid: int
    shape: tuple[int, ...]


@dataclass
class ConstV:
    value: np.ndarray  # float value
    raw: tuple | None = None  # DequantizeLinear of an initializer: (ints, scale, zero point, axis)


@dataclass
class ShapeV:
    """An integer tensor computed from activation shapes: its value at each of ``SHAPE_BATCHES``."""

    at: tuple[np.ndarray, ...]


SHAPE_BATCHES = (2, 3)  # the batch sizes shape arithmetic is evaluated at (two, to tell the batch apart)


def plan_shape(shape: tuple[int, ...], tokens: bool) -> tuple[int, ...]:
    """The plan's shape of a value of the model's ``shape``: a token tensor's is transposed."""
    return (shape[1], shape[0]) if tokens else tuple(shape)


def _at(v, i: int) -> np.ndarray:
    return v.at[i] if isinstance(v, ShapeV) else v.value


def _onnx_reshape(shape: tuple[int, ...], target) -> tuple[int, ...]:
    """ONNX Reshape's output shape (``0`` copies the input's dimension, ``-1`` is inferred)."""
    out = [shape[i] if int(t) == 0 else int(t) for i, t in enumerate(target)]
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(shape)) // max(known, 1)
    if int(np.prod(out)) != int(np.prod(shape)):
        raise EngineError(f"Reshape of {shape} to {list(target)}: the element counts differ")
    return tuple(out)


def _per_sample(shapes: list[tuple[int, ...]], node) -> tuple[int, ...]:
    """The per-sample shape of an op output whose full shape at each of ``SHAPE_BATCHES`` is ``shapes``."""
    if all(s[0] == b for s, b in zip(shapes, SHAPE_BATCHES, strict=True)) and len({s[1:] for s in shapes}) == 1:
        return shapes[0][1:]
    raise EngineError(
        f"node {node.name!r} ({node.op_type}): its output shape {shapes[0]} at batch {SHAPE_BATCHES[0]} does not keep "
        "the batch as the leading dimension; the cuda backend runs a dynamic batch and needs it there"
    )


def has_border(g: dict) -> bool:
    """Whether some kernel tap of a conv falls outside the image for some output pixel (padding, ragged edge)."""
    last_h = (g["oh"] - 1) * g["sh"] - g["ph"] + (g["kh"] - 1) * g["dh"]
    last_w = (g["ow"] - 1) * g["sw"] - g["pw"] + (g["kw"] - 1) * g["dw"]
    return g["ph"] > 0 or g["pw"] > 0 or last_h >= g["h"] or last_w >= g["w"]


def _pool_out(size: int, k: int, s: int, p0: int, p1: int, d: int, ceil: bool) -> int:
    span = size + p0 + p1 - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p0:  # the last window must start inside the image or its left pad
        out -= 1
    return out


class _Lowering:
    def __init__(self, model, layers: dict, glue: str = "fp32"):
        self.graph = model.graph
        self.layers = layers
        self.glue = glue
        self.const = constant_values(model)  # fp8 initializers as float8e4m3fn arrays (base.fp8_array)
        self.count: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.count[name] = self.count.get(name, 0) + 1
        for o in self.graph.output:
            self.count[o.name] = self.count.get(o.name, 0) + 1
        self.values: dict[str, object] = {}
        self.tensors: dict[int, TensorInfo] = {}
        self.ops: list = []
        self.dequantized: dict[int, int] = {}  # 8-bit tensor -> its float copy (one Dequantize per tensor)
        self.aliases: dict[int, int] = {}
        self.notes: dict[str, str] = {}

    # ------------------------------------------------------------------ tensors and values
    def new_tensor(self, shape, dtype: str, perm=None) -> int:
        tid = len(self.tensors)
        self.tensors[tid] = TensorInfo(tid, tuple(int(d) for d in shape), dtype, perm)
        return tid

    def value(self, name: str):
        if name == "":
            return None
        if name in self.values:
            return self.values[name]
        v = self.const(name)
        if v is None:
            raise EngineError(f"tensor {name!r} has no producer the cuda backend understands")
        return ConstV(np.asarray(v))

    def constant(self, name: str):
        """The value of a constant input (an initializer, a Constant, or shape arithmetic folded here), or None."""
        v = self.values.get(name)
        if isinstance(v, ConstV):
            return v.value
        return None if v is not None else self.const(name)

    def single(self, name: str) -> bool:
        return self.count.get(name, 0) == 1

    def layer(self, node_name: str) -> str | None:
        return layer_of_node(node_name, self.layers)

    def precision(self, node_name: str) -> str:
        layer = self.layer(node_name)
        return self.layers[layer]["precision"] if layer else "fp32"

    def emit(self, op):
        self.ops.append(op)
        return op

    # ------------------------------------------------------------------ materialization
    def q_tensor(self, q: QuantV, node: str, tokens: bool = False) -> int:
        """The 8-bit tensor of ``q``, quantizing its float source now if no conv did it on load (in the token
        layout when ``tokens``: the caller checks ``q.tokens``, a tensor already stored the other way stays so)."""
        if q.tid is None:
            src = self.transposed(q.lazy) if tokens else q.lazy
            q.tid = self.new_tensor(plan_shape(q.shape, tokens), q.grid.dtype)
            q.tokens = tokens
            self.emit(Quantize(node, src, q.tid, q.grid))
        return q.tid

    def transposed(self, tid: int, node: str = "tokens") -> int:
        """A float (T, C) tensor as the (C, T) view the token layout reads, or back (a Transpose view, no copy)."""
        info = self.tensors[tid]
        out = self.new_tensor(plan_shape(info.shape, True), info.dtype)
        self.emit(TorchOp(node, "Transpose", [tid], {"perm": [0, 2, 1]}, out, info.dtype))
        return out

    def as_float(self, v, node: str, dtype: str | None = None) -> int:
        if isinstance(v, FloatV):
            return v.tid
        if isinstance(v, DQV):
            op = self.open_conv(v)  # an int8 conv output only dequantized here: keep it float, fake-quantized
            if op is not None:
                return self.seal_float(op, v.q.shape)
            tid = self.q_tensor(v.q, node)
            if tid not in self.dequantized:
                info = self.tensors[tid]
                out = self.new_tensor(info.shape, "fp32")
                self.emit(TorchOp(node, "Dequantize", [tid], {}, out, grid=v.q.grid))
                self.dequantized[tid] = self.transposed(out, node) if v.q.tokens else out
            return self.dequantized[tid]
        if isinstance(v, PendingV):
            tid = self.seal_float(v.op, v.shape)
            self.values[v.name] = FloatV(tid, v.shape)  # its other readers take the same float tensor
            return tid
        if isinstance(v, QuantV):
            raise EngineError(f"node {node!r}: a quantized tensor is used without DequantizeLinear")
        raise EngineError(f"node {node!r}: a constant is used as an activation (not supported by the cuda backend)")

    def seal_float(self, op, shape) -> int:
        """Close ``op``'s epilogue with a float output: the tensor of the model's ``shape``."""
        op.out_grid = None
        tokens = _is_tokens(op)
        if self.glue == "fp16" and isinstance(op, QConv) and op.mode in ("int8", "fp8"):
            op.out_dtype = "fp16"  # read by the glue (or a float layer, which casts it back)
        op.out = self.new_tensor(plan_shape(shape, tokens), op.out_dtype if isinstance(op, QConv) else "fp32")
        self.emit(op)
        return self.transposed(op.out, op.node) if tokens else op.out

    def seal_q(self, op, shape, grid: Grid | F8Grid) -> QuantV:
        """Close ``op``'s epilogue with an 8-bit output of ``grid`` (the model's ``shape``)."""
        op.out_grid = grid
        tokens = _is_tokens(op)
        op.out = self.new_tensor(plan_shape(shape, tokens), grid.dtype)
        self.emit(op)
        return QuantV(op.out, grid, shape, "", tokens=tokens)

    def open_conv(self, v, need=lambda op: True) -> QConv | None:
        """The QConv whose open epilogue takes the next op on ``v`` (if ``need(op)``): a single-use pending
        value, or an int8 conv output that is only dequantized for this node (reopened: its quantization
        becomes the fake-quant stage)."""
        if isinstance(v, PendingV) and self.single(v.name):
            return v.op if isinstance(v.op, QConv) and need(v.op) else None
        if isinstance(v, DQV) and self.single(v.name) and self.single(v.q.name):
            op = self.producer(v.q.tid)
            if (
                isinstance(op, QConv)
                and op.out == v.q.tid
                and op.out2 is None
                and op.q0 is None
                and op.res is None
                and op.act is None
                and need(op)
            ):
                self.ops.remove(op)
                op.q0, op.out, op.out_grid = op.out_grid, None, None
                return op
        return None

    def producer(self, tid):
        if tid is None:
            return None
        for op in self.ops:
            if tid in (op.out, getattr(op, "out2", None)):
                return op
        return None

    # ------------------------------------------------------------------ nodes
    def run(self) -> Plan:
        graph_input = self.graph.input[0]
        dims = graph_input.type.tensor_type.shape.dim
        shape = tuple(int(d.dim_value) for d in list(dims)[1:])
        if any(d <= 0 for d in shape):
            raise EngineError(f"model input {graph_input.name!r} needs static dimensions after the batch")
        self.input_shape = shape
        self.values[graph_input.name] = FloatV(self.new_tensor(shape, "fp32"), shape)
        for node in self.graph.node:
            folded = self.fold(node)
            if folded is not None:
                self.values.update(zip(node.output, folded, strict=True))
                continue
            handler = getattr(self, f"on_{node.op_type}", None)
            out = handler(node) if handler else self.on_float(node)
            if isinstance(out, list):  # one value per output (Split)
                self.values.update(zip(node.output, out, strict=True))
            elif out is not None:
                self.values[node.output[0]] = out
        if len(self.graph.output) != 1:
            raise EngineError(f"the model has {len(self.graph.output)} outputs; mixq engines return one tensor")
        out_value = self.value(self.graph.output[0].name)
        out = self.as_float(out_value, "output")
        info = self.tensors[out]
        if info.dtype != "fp32":
            cast = self.new_tensor(info.shape, "fp32")
            self.emit(TorchOp("output", "Cast", [out], {}, cast))
            out = cast
        return Plan(self.ops, self.tensors, out, self.input_shape, self.aliases, self.notes)

    def on_Constant(self, node):
        return None  # read through the constant resolver

    def on_Transpose(self, node):
        v = self.value(node.input[0])
        if not isinstance(v, ConstV):
            return self.on_float(node)
        perm = list(attributes(node).get("perm", reversed(range(v.value.ndim))))
        raw = v.raw
        if raw is not None:  # a weight through DequantizeLinear (a MatMul's [K, N] of a Linear's [N, K])
            ints, scale, zp, axis = raw
            raw = (ints.transpose(perm), scale, zp, perm.index(axis % ints.ndim) if scale.size > 1 else axis)
        return ConstV(v.value.transpose(perm), raw)

    # ---------------------------------------------------------------- shape arithmetic
    def on_Shape(self, node):
        v = self.value(node.input[0])
        a = attributes(node)
        start, end = a.get("start", 0), a.get("end", None)
        if isinstance(v, ConstV | ShapeV):
            value = v.value if isinstance(v, ConstV) else v.at[0]  # shape arithmetic keeps its rank at any batch
            return ConstV(np.array(value.shape, np.int64)[start:end])
        shape = self._shape(v)
        return ShapeV(tuple(np.array([b, *shape], np.int64)[start:end] for b in SHAPE_BATCHES))

    def fold(self, node) -> list | None:
        """The outputs of ``node`` when every input is a constant (not a quantized weight) or shape arithmetic
        (evaluated by onnx's reference implementation at each batch size), else None. A result equal at every
        batch size is a constant."""
        if node.op_type in ("Constant", "Identity", "QuantizeLinear", "DequantizeLinear", "Shape") or not node.input:
            return None
        values = [self.value(name) if name else None for name in node.input]
        if not all(v is None or isinstance(v, ShapeV) or (isinstance(v, ConstV) and v.raw is None) for v in values):
            return None
        from onnx.reference import ReferenceEvaluator

        run = ReferenceEvaluator(node)
        names = [name for name in node.input if name]
        results = []
        for i in range(len(SHAPE_BATCHES)):
            feeds = dict(zip(node.input, values, strict=True))
            results.append(run.run(None, {n: _at(feeds[n], i) for n in names}))
        out = []
        for per_batch in zip(*results, strict=True):
            same = all(np.array_equal(per_batch[0], r) and per_batch[0].shape == r.shape for r in per_batch)
            if not same and not np.issubdtype(np.asarray(per_batch[0]).dtype, np.integer):
                return None  # data of the batch's size (an Expand of a constant): the op's own handler runs it
            out.append(ConstV(np.asarray(per_batch[0])) if same else ShapeV(tuple(np.asarray(r) for r in per_batch)))
        return out

    def target_shape(self, node, name: str, shape: tuple[int, ...], how) -> tuple[int, ...] | None:
        """The per-sample output shape of a Reshape/Expand of an activation of per-sample ``shape`` to the target
        tensor ``name`` (``how(full input shape, target)``: the full output shape), or None if not constant."""
        target = self.value(name)
        if isinstance(target, ShapeV):
            targets = target.at
        elif isinstance(target, ConstV):
            targets = (target.value,) * len(SHAPE_BATCHES)
        else:
            return None
        outs = [
            how((b, *shape), [int(t) for t in np.asarray(v).reshape(-1)])
            for b, v in zip(SHAPE_BATCHES, targets, strict=True)
        ]
        return _per_sample([tuple(int(d) for d in o) for o in outs], node)

    def on_Expand(self, node):
        x = self.value(node.input[0])
        if isinstance(x, ConstV):  # e.g. a ViT's class token expanded to the batch
            out = self.target_shape(node, node.input[1], tuple(x.value.shape[1:]) if x.value.ndim else (),
                                    lambda s, t: np.broadcast_shapes(s, tuple(t)))  # fmt: skip
            if x.value.ndim == 0 or x.value.shape[0] != 1:
                raise EngineError(f"node {node.name!r}: Expand of a constant whose first dimension is not 1")
            value = np.ascontiguousarray(np.broadcast_to(x.value, (1, *out)))
            tid = self.new_tensor(out, "fp32")
            self.emit(TorchOp(node.name, "ExpandBatch", [value, INPUT], {}, tid))
            return FloatV(tid, out)
        shape = self._shape(x)
        out = self.target_shape(node, node.input[1], shape, lambda s, t: np.broadcast_shapes(s, tuple(t)))
        return self.float_op(node, [x, ConstV(np.array([1, *out], np.int64))])

    def on_Identity(self, node):
        v = self.value(node.input[0])
        if isinstance(v, ConstV):
            return None
        return v

    def on_QuantizeLinear(self, node):
        v = self.value(node.input[0])
        grid = Grid.from_onnx(self.const(node.input[1]), self.const(node.input[2]))
        name = node.output[0]
        if isinstance(v, PendingV) and self.single(v.name):
            q = self.seal_q(v.op, v.shape, grid)
            q.name = name
            return q
        if isinstance(v, DQV):
            return self.requantize(v, grid, node, name)
        if isinstance(v, FloatV):
            return QuantV(None, grid, v.shape, name, lazy=v.tid)
        if isinstance(v, PendingV):
            return QuantV(None, grid, v.shape, name, lazy=self.as_float(v, node.name))
        raise EngineError(f"node {node.name!r}: QuantizeLinear of a constant is not supported by the cuda backend")

    def requantize(self, v: DQV, grid: Grid, node, name: str) -> QuantV:
        q = v.q
        if q.tid is None and q.lazy is not None:  # quantize the float source onto the new grid once more
            src = QuantV(None, q.grid, q.shape, q.name, lazy=q.lazy)
            self.q_tensor(src, node.name)
            q = src
        if q.grid.same_values(grid):
            return QuantV(q.tid, grid, q.shape, name, tokens=q.tokens)
        op = self.producer(q.tid)
        alone = self.single(v.name) and self.single(q.name)
        stored = plan_shape(q.shape, q.tokens)
        if isinstance(op, QConv) and op.out == q.tid and op.out2 is None and op.out_grid is not None:
            op.out2 = self.new_tensor(stored, grid.dtype, self.tensors[q.tid].perm)
            op.out2_grid = grid
            op.store1 = not alone
            op.absorbed.append(node.name)
            return QuantV(op.out2, grid, q.shape, name, tokens=q.tokens)
        if isinstance(op, QPool) and op.is_max and alone:
            op.out_grid = grid  # max commutes with the monotonic requantization
            op.absorbed.append(node.name)
            return QuantV(q.tid, grid, q.shape, name)
        out = self.new_tensor(stored, grid.dtype, self.tensors[q.tid].perm)
        self.emit(Requant(node.name, q.tid, q.grid, out, grid))
        return QuantV(out, grid, q.shape, name, tokens=q.tokens)

    def on_DequantizeLinear(self, node):
        v = self.value(node.input[0])
        if isinstance(v, QuantV):
            return DQV(v, node.output[0])
        if isinstance(v, ConstV):
            ints = v.value
            scale = np.asarray(self.const(node.input[1]), np.float64)
            zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), ints.dtype)
            axis = attributes(node).get("axis", 1)
            shape = [1] * ints.ndim
            if scale.size > 1:
                shape[axis] = -1
            value = (ints.astype(np.float64) - np.asarray(zp, np.float64).reshape(shape)) * scale.reshape(shape)
            return ConstV(value.astype(np.float32), (ints, scale, np.asarray(zp), axis))
        raise EngineError(f"node {node.name!r}: DequantizeLinear of something other than a QuantizeLinear output")

    # ---------------------------------------------------------------- conv / gemm
    def _q_weight(self, w: ConstV) -> tuple[str, np.ndarray, np.ndarray] | None:
        """(``"int8"``, integer weights minus their zero point as int8 [Cout, ...], per-output-channel scale), or
        (``"fp8"``, e4m3 weights as float32 (exact), scale), or None when the weight is no such initializer
        through DequantizeLinear (a float weight, a per-input-channel scale, an int8 difference out of range)."""
        if w.raw is None:
            return None
        ints, scale, zp, axis = w.raw
        cout = ints.shape[0]
        if scale.size > 1 and axis != 0:
            return None
        scale = np.broadcast_to(scale.reshape(-1), (cout,)).astype(np.float64)
        if is_fp8(ints):
            if np.asarray(zp, np.float32).any():
                return None
            return "fp8", np.asarray(ints, np.float32), scale
        if ints.dtype not in (np.int8, np.uint8):
            return None
        shape = [-1] + [1] * (ints.ndim - 1) if zp.size > 1 else []
        centred = ints.astype(np.int64) - (zp.astype(np.int64).reshape(shape) if shape else zp.astype(np.int64))
        if centred.min(initial=0) < -128 or centred.max(initial=0) > 127:
            return None
        return "int8", centred.astype(np.int8), scale

    def on_Conv(self, node):
        a = attributes(node)
        x, w = self.value(node.input[0]), self.value(node.input[1])
        b = self.value(node.input[2]) if len(node.input) > 2 else None
        if not isinstance(w, ConstV) or (b is not None and not isinstance(b, ConstV)):
            return self.on_float(node)
        shape = self._shape(x)
        nd = w.value.ndim - 2
        if a.get("group", 1) != 1 or nd not in (1, 2) or len(shape) != nd + 1:
            return self.on_float(node)
        kernel = list(w.value.shape[2:])
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        pads = list(a.get("pads", [0] * (2 * nd)))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return self.on_float(node)
        spatial = list(shape[1:])
        if nd == 1:  # a 1d conv is a 2d conv on a 1-pixel-high image
            kernel, strides, dil, spatial = [1, *kernel], [1, *strides], [1, *dil], [1, *spatial]
            pads = [0, pads[0], 0, pads[1]]
        out_hw = [
            (spatial[i] + pads[i] + pads[i + 2] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(2)
        ]
        cout = w.value.shape[0]
        geometry = {
            "cin": shape[0], "h": spatial[0], "w": spatial[1], "kh": kernel[0], "kw": kernel[1],
            "sh": strides[0], "sw": strides[1], "ph": pads[0], "pw": pads[1], "dh": dil[0], "dw": dil[1],
            "cout": cout, "oh": out_hw[0], "ow": out_hw[1],
        }  # fmt: skip
        out_shape = (cout, *out_hw) if nd == 2 else (cout, out_hw[1])
        weight = w.value if nd == 2 else w.value[:, :, None, :]
        raw = w.raw
        if raw is not None and nd == 1:
            raw = (raw[0][:, :, None, :], *raw[1:])
        op = self._conv_op(node, x, ConstV(weight, raw), b, geometry)
        return PendingV(op, out_shape, node.output[0]) if op is not None else self.on_float(node)

    def on_Gemm(self, node):
        a = attributes(node)
        x, w = self.value(node.input[0]), self.value(node.input[1])
        b = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        plain = a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
        if not plain or not isinstance(w, ConstV) or (b is not None and not isinstance(b, ConstV)):
            return self.on_float(node)
        if len(self._shape(x)) != 1:
            return self.on_float(node)
        weight, raw = w.value, w.raw
        if not a.get("transB", 0):  # [K, N] -> [N, K]; a per-column scale becomes per-row
            weight = weight.T
            if raw is not None:
                raw = (raw[0].T, raw[1], raw[2].T if raw[2].ndim else raw[2], 1 - raw[3] if raw[1].size > 1 else 0)
        if b is not None and b.value.size not in (1, weight.shape[0]):
            return self.on_float(node)
        return self._linear(node, x, ConstV(weight, raw), b)

    def _linear(self, node, x, w: ConstV, b: ConstV | None):
        """A linear layer on one vector per sample (weight [N, K])."""
        weight, raw = w.value, w.raw
        perm = self._perm(x)
        if perm is not None:  # the input is stored NHWC-flattened: reorder the weight's columns to match
            weight = weight[:, perm]
            if raw is not None:
                raw = (raw[0][:, perm], *raw[1:])
        k, cout = weight.shape[1], weight.shape[0]
        geometry = {
            "cin": k, "h": 1, "w": 1, "kh": 1, "kw": 1, "sh": 1, "sw": 1, "ph": 0, "pw": 0, "dh": 1, "dw": 1,
            "cout": cout, "oh": 1, "ow": 1,
        }  # fmt: skip
        w4 = ConstV(weight[:, :, None, None], None if raw is None else (raw[0][:, :, None, None], *raw[1:]))
        op = self._conv_op(node, x, w4, b, geometry)
        return PendingV(op, (cout,), node.output[0]) if op is not None else self.on_float(node)

    def _perm(self, x):
        if isinstance(x, DQV) and x.q.tid is not None:
            return self.tensors[x.q.tid].perm
        return None

    def _conv_op(self, node, x, w: ConstV, b: ConstV | None, geometry: dict) -> QConv | None:
        cout = geometry["cout"]
        bias = np.zeros(cout) if b is None else np.broadcast_to(b.value.astype(np.float64).reshape(-1), (cout,))
        precision = self.precision(node.name)
        qw = self._q_weight(w)
        tokens = geometry.get("tokens", False)
        if isinstance(x, DQV) and x.q.tid is not None and x.q.tokens != tokens:
            x = FloatV(self.as_float(x, node.name), x.q.shape)  # stored the other way round: through float
        if isinstance(x, DQV) and qw is not None and qw[0] == x.q.grid.dtype:  # int8 x int8 or e4m3 x e4m3
            q = x.q
            on_load = q.tid is None and self.single(x.name) and self.single(q.name)
            if on_load:
                tid = self.transposed(q.lazy, node.name) if tokens else q.lazy
            else:
                tid = self.q_tensor(q, node.name, tokens)
            return QConv(node.name, qw[0], tid, on_load, q.grid, qw[1], qw[2], bias.copy(), geometry)
        if precision == "fp8":
            self.note_fp8(node.name, self._why_not_fp8(x, qw))
        if precision != "fp16" and w.raw is None and isinstance(x, DQV):
            # A float layer after an int8 or fp8 one: fp32 operands (IEEE), its input dequantized as it is loaded
            tid = self.q_tensor(x.q, node.name, tokens)
            return QConv(node.name, "fp32", tid, False, x.q.grid, w.value.astype(np.float32), np.ones(cout),
                         bias.copy(), geometry)  # fmt: skip
        if precision == "fp16" and w.raw is None:
            if isinstance(x, DQV):
                tid, x_float, grid = self.q_tensor(x.q, node.name, tokens), False, x.q.grid
            else:
                tid, x_float, grid = self.as_float(x, node.name), True, None
                tid = self.transposed(tid, node.name) if tokens else tid
            return QConv(node.name, "fp16", tid, x_float, grid, w.value.astype(np.float32), np.ones(cout),
                         bias.copy(), geometry, out_dtype="fp16")  # fmt: skip
        return None

    @staticmethod
    def _why_not_fp8(x, qw) -> str:
        x_fp8 = isinstance(x, DQV) and x.q.grid.dtype == "fp8"
        if qw is None or qw[0] != "fp8":
            what = "a float initializer" if qw is None else f"an {qw[0]} initializer"
            return f"its weight is {what}, not FLOAT8E4M3FN through DequantizeLinear"
        if not x_fp8:
            what = "an int8 DequantizeLinear" if isinstance(x, DQV) else "a float tensor (no QuantizeLinear)"
            return f"its input comes from {what}, not an fp8 (FLOAT8E4M3FN) QuantizeLinear/DequantizeLinear"
        return "its input and weight are fp8 but the op's attributes have no fp8 kernel here"

    def note_fp8(self, node_name: str, why: str) -> None:
        layer = self.layer(node_name)
        if layer is not None:
            self.notes.setdefault(layer, why)

    # ---------------------------------------------------------------- elementwise
    def on_Relu(self, node):
        v = self.value(node.input[0])
        op = self.open_conv(v, lambda op: op.act is None)
        if op is not None:
            op.act = (0.0, math.inf)
            op.absorbed.append(node.name)
            return PendingV(op, self._shape(v), node.output[0])
        if isinstance(v, DQV) and v.q.tid is not None:
            q = v.q
            out = self.new_tensor(plan_shape(q.shape, q.tokens), q.grid.dtype, self.tensors[q.tid].perm)
            self.emit(Requant(node.name, q.tid, q.grid, out, q.grid, lo=q.grid.zp))
            return DQV(QuantV(out, q.grid, q.shape, node.output[0] + ".q", tokens=q.tokens), node.output[0])
        return self.on_float(node)

    def on_Clip(self, node):
        v = self.value(node.input[0])
        lo = self.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        op = self.open_conv(v, lambda op: op.act is None)
        if op is not None:
            op.act = (lo, hi)
            op.absorbed.append(node.name)
            return PendingV(op, self._shape(v), node.output[0])
        return self.on_float(node)

    def on_Add(self, node):
        a, b = self.value(node.input[0]), self.value(node.input[1])
        for main, other in ((a, b), (b, a)):
            if isinstance(other, ConstV) and other.raw is None and isinstance(main, PendingV):
                shape = self._shape(main)
                op = self.open_conv(main, lambda op: op.sc is None and op.res is None and op.act is None)
                if op is not None and _is_channel_vector(other.value, op, shape):
                    op.bias = op.bias + other.value.astype(np.float64).reshape(-1)  # a Linear's bias (MatMul + Add)
                    op.absorbed.append(node.name)
                    return PendingV(op, shape, node.output[0])
        for main, other in ((a, b), (b, a)):
            if not isinstance(other, DQV | FloatV | PendingV) or not isinstance(main, DQV | FloatV | PendingV):
                continue
            if self._shape(main) != self._shape(other):
                continue
            op = self.open_conv(main, lambda op: op.res is None and op.act is None and op.sc is None)
            if op is None:
                continue
            tokens = _is_tokens(op)
            if self._fuse_shortcut(op, other):
                pass
            elif isinstance(other, DQV) and (other.q.tid is None or other.q.tokens == tokens):
                op.res = (self.q_tensor(other.q, node.name, tokens), other.q.grid)
            else:
                res = self.as_float(other, node.name)
                op.res = (self.transposed(res, node.name) if tokens else res, None)
            op.absorbed.append(node.name)
            return PendingV(op, self._shape(main), node.output[0])
        return self.on_float(node)

    def _fuse_shortcut(self, op: QConv, other) -> bool:
        sc = other.op if isinstance(other, PendingV) else None
        if not (
            isinstance(sc, QConv)
            and self.single(other.name)
            and sc.out is None
            and op.mode == sc.mode
            and op.mode in ("int8", "fp8")
            and op.grid.dtype == sc.grid.dtype
            and not sc.x_float
            and sc.sc is None
            and sc.q0 is None
            and sc.res is None
            and sc.act is None
            and sc.geometry["cout"] == op.geometry["cout"]
            and _is_tokens(sc) == _is_tokens(op)
            and (sc.geometry["oh"], sc.geometry["ow"]) == (op.geometry["oh"], op.geometry["ow"])
            and (sc.geometry["dh"], sc.geometry["dw"]) == (1, 1)
            # int8: its input is read as 0 outside the image, not the zero point: no border allowed (fp8: 0 is exact)
            and (op.mode == "fp8" or not has_border(sc.geometry))
        ):
            return False
        op.sc = Shortcut(sc.node, sc.x, sc.grid, sc.weight, sc.w_scale, sc.bias, sc.geometry)
        op.absorbed.append(sc.node)
        return True

    # ---------------------------------------------------------------- pools and shapes
    def on_MaxPool(self, node):
        return self._pool(node, is_max=True)

    def on_AveragePool(self, node):
        return self._pool(node, is_max=False)

    def on_GlobalAveragePool(self, node):
        return self._pool(node, is_max=False, global_pool=True)

    def _pool(self, node, is_max: bool, global_pool: bool = False):
        v = self.value(node.input[0])
        if not isinstance(v, DQV) or len(v.q.shape) != 3:
            return self.on_float(node)
        a = attributes(node)
        c, h, w = v.q.shape
        if global_pool:
            kh, kw, sh, sw, pads, ceil = h, w, 1, 1, [0, 0, 0, 0], False
        else:
            if list(a.get("dilations", [1, 1])) != [1, 1] or a.get("storage_order", 0):
                return self.on_float(node)
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return self.on_float(node)
            kh, kw = a["kernel_shape"]
            sh, sw = a.get("strides", [1, 1])
            pads = list(a.get("pads", [0, 0, 0, 0]))
            ceil = bool(a.get("ceil_mode", 0))
        oh = _pool_out(h, kh, sh, pads[0], pads[2], 1, ceil)
        ow = _pool_out(w, kw, sw, pads[1], pads[3], 1, ceil)
        geometry = {
            "c": c, "h": h, "w": w, "kh": kh, "kw": kw, "sh": sh, "sw": sw, "ph": pads[0], "pw": pads[1],
            "oh": oh, "ow": ow, "count_pad": bool(a.get("count_include_pad", 0)),
        }  # fmt: skip
        op = QPool(node.name, self.q_tensor(v.q, node.name), v.q.grid, is_max, geometry)
        if is_max:
            q = self.seal_q(op, (c, oh, ow), v.q.grid)
            q.name = node.output[0] + ".q"
            return DQV(q, node.output[0])
        return PendingV(op, (c, oh, ow), node.output[0])

    def on_Flatten(self, node):
        v = self.value(node.input[0])
        if attributes(node).get("axis", 1) != 1:
            return self.on_float(node)
        return self._flatten(v, node)

    def on_Reshape(self, node):
        v = self.value(node.input[0])
        if isinstance(v, ConstV | ShapeV):
            return self.on_float(node)
        shape = self._shape(v)
        out = self.target_shape(node, node.input[1], shape, _onnx_reshape)
        if out is None:
            return self.on_float(node)
        if len(out) == 1:
            return self._flatten(v, node)
        return self.float_op(node, [v, ConstV(np.array([-1, *out], np.int64))])

    def on_Split(self, node):
        """One Slice per output (a transformer's q, k, v out of the one in_proj output)."""
        v = self.value(node.input[0])
        shape = self._shape(v)
        a = attributes(node)
        axis = a.get("axis", 0) % (len(shape) + 1)
        if axis == 0:
            raise EngineError(f"node {node.name!r}: Split along the batch dimension")
        sizes = self.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("split")
        if sizes is None:
            count = a.get("num_outputs", len(node.output))
            size = -(-shape[axis - 1] // count)
            sizes = [min(size, shape[axis - 1] - i * size) for i in range(count)]
        tid = self.as_float(v, node.name)
        outs, start = [], 0
        for size in [int(s) for s in np.asarray(sizes).reshape(-1)]:
            part = self.float_op(node, [FloatV(tid, shape), ConstV(np.array([start])), ConstV(np.array([start + size])),
                                        ConstV(np.array([axis]))], op_type="Slice")  # fmt: skip
            outs.append(part)
            start += size
        return outs

    def on_MatMul(self, node):
        """A MatMul by a constant [K, N] weight: a Linear (on one vector per sample, like Gemm, or on (T, K)
        tokens: a 1x1 conv over a 1 x T image, see the module doc); anything else runs in float."""
        x, w = self.value(node.input[0]), self.value(node.input[1])
        if not isinstance(w, ConstV) or w.value.ndim != 2 or isinstance(x, ConstV | ShapeV):
            return self.on_float(node)
        shape = self._shape(x)
        if len(shape) not in (1, 2) or shape[-1] != w.value.shape[0]:
            return self.on_float(node)
        weight, raw = w.value.T, w.raw  # [K, N] -> [N, K]; a per-column scale becomes per-row
        if raw is not None:
            raw = (raw[0].T, raw[1], raw[2].T if raw[2].ndim else raw[2], 1 - raw[3] if raw[1].size > 1 else 0)
        if len(shape) == 1:
            return self._linear(node, x, ConstV(weight, raw), None)
        tokens, k = shape
        cout = weight.shape[0]
        geometry = {
            "cin": k, "h": 1, "w": tokens, "kh": 1, "kw": 1, "sh": 1, "sw": 1, "ph": 0, "pw": 0, "dh": 1, "dw": 1,
            "cout": cout, "oh": 1, "ow": tokens, "tokens": True,
        }  # fmt: skip
        w4 = ConstV(weight[:, :, None, None], None if raw is None else (raw[0][:, :, None, None], *raw[1:]))
        op = self._conv_op(node, x, w4, None, geometry)
        return PendingV(op, (tokens, cout), node.output[0]) if op is not None else self.on_float(node)

    def _flatten(self, v, node):
        shape = self._shape(v)
        flat = (int(np.prod(shape)),)
        if isinstance(v, DQV) and len(shape) == 3:
            q = v.q
            tid = self.q_tensor(q, node.name)
            c, h, w = shape
            perm = None
            if h * w > 1:  # stored NHWC: stored position (y, x, c) holds NCHW feature c*h*w + y*w + x
                perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
            view = self.new_tensor(flat, self.tensors[tid].dtype, perm)
            self.aliases[view] = tid
            return DQV(QuantV(view, q.grid, flat, q.name), node.output[0])
        if isinstance(v, PendingV) and isinstance(v.op, QPool) and shape[1:] == (1, 1):
            return PendingV(v.op, flat, v.name)
        if isinstance(v, DQV) and len(shape) == 1:
            return v
        return self.on_float(node)

    def _shape(self, v) -> tuple[int, ...]:
        if isinstance(v, DQV):
            return v.q.shape
        if isinstance(v, QuantV | PendingV | FloatV):
            return v.shape
        raise EngineError("a constant is used where an activation is expected (not supported by the cuda backend)")

    # ---------------------------------------------------------------- everything else: float ops
    FLOAT_OPS = frozenset(
        {
            "Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Flatten", "Reshape", "BatchNormalization", "LogSoftmax", "Softmax", "Sigmoid",
            "Tanh", "Concat", "Transpose", "ReduceMean", "Squeeze", "Unsqueeze", "LayerNormalization", "Erf", "Gelu",
            "Gather", "Slice", "Pow", "Sqrt", "Neg", "Expand", "Cast", "Softplus", "HardSigmoid", "HardSwish",
            "ScaledDotProductAttention",
        }
    )  # fmt: skip
    HANDLED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Constant", "Identity", "Shape", "Split"})

    def on_float(self, node):
        return self.float_op(node, [self.value(name) if name else None for name in node.input])

    def float_op(self, node, values: list, op_type: str | None = None):
        """``node`` (or ``op_type`` with ``node``'s attributes) run by torch on the float form of ``values``."""
        op_type = op_type or node.op_type
        if op_type not in self.FLOAT_OPS:
            raise EngineError(
                f"node {node.name!r}: ONNX op {op_type} is not supported by the cuda backend "
                f"(supported: {sorted(self.FLOAT_OPS | self.HANDLED_OPS)})"
            )
        glue = self.layer(node.name) is None  # no config entry covers it: LayerNorm, GELU, attention, residual adds
        dtype = "fp16" if self.precision(node.name) == "fp16" or (glue and self.glue == "fp16") else "fp32"
        if op_type in ("Conv", "Gemm", "MatMul") and self.precision(node.name) == "fp8":
            self.note_fp8(node.name, f"this {op_type} (its attributes or input shape) has no fp8 kernel here")
        inputs, shapes = [], []
        for v in values:
            if v is None:
                inputs.append(None)
            elif isinstance(v, ConstV):
                inputs.append(v.value)
            elif isinstance(v, ShapeV):
                raise EngineError(
                    f"node {node.name!r} ({op_type}): an input computed from the batch size is used as data; "
                    "the cuda backend folds shape arithmetic only into Reshape and Expand targets"
                )
            else:
                inputs.append(self.as_float(v, node.name))
                shapes.append(self._shape(v))
        attrs = attributes(node) if op_type == node.op_type else {}
        out_shape = _float_shape(op_type, attrs, inputs, shapes, self.tensors)
        out = self.new_tensor(out_shape, dtype)
        self.emit(TorchOp(node.name, op_type, inputs, attrs, out, dtype))
        return FloatV(out, out_shape)


def _float_shape(op: str, attrs: dict, inputs: list, shapes: list, tensors) -> tuple[int, ...]:
    """Per-image output shape of a float op, from a tiny shape inference on a batch of 1 with numpy-free rules."""
    import torch

    from .torch_ops import run_torch_op

    def example(i):
        if isinstance(i, int):
            return torch.zeros((1, *tensors[i].shape))
        return None if i is None else torch.from_numpy(np.array(i))

    with torch.no_grad():
        out = run_torch_op(op, [example(i) for i in inputs], attrs)
    return tuple(out.shape[1:])


def _is_tokens(op) -> bool:
    return isinstance(op, QConv) and op.geometry.get("tokens", False)


def _is_channel_vector(value: np.ndarray, op, shape: tuple[int, ...]) -> bool:
    """Whether adding the constant ``value`` to ``op``'s output (of the model's ``shape``) adds one number per
    output channel (a bias): ``[..., N]`` for a linear, ``[1, C, 1, 1]``-like for a conv."""
    cout = op.geometry["cout"]
    if value.size != cout or value.ndim == 0 or value.ndim > len(shape) + 1:
        return False
    if _is_tokens(op) or len(shape) == 1:
        return value.shape[-1] == cout
    full = (1,) * (len(shape) + 1 - value.ndim) + tuple(value.shape)
    return full[1] == cout and all(d == 1 for d in full[2:])


def lower(model, layers: dict, glue: str = "fp32") -> Plan:
    """The fused op plan of a Q/DQ ONNX model (see the module doc; GELU and attention first become one node each,
    :mod:`.patterns`); errors name the node. ``glue``: the precision of the float ops no layer of ``layers``
    covers (LayerNorm, GELU, softmax/attention, residual adds, layout changes) and of the float outputs of the
    int8/fp8 kernels: ``fp32`` computes them as the fake-quant model does; ``fp16`` halves their memory traffic
    and runs attention on the fp16 tensor cores (flash attention), at fp16 rounding."""
    from .patterns import fuse_float_patterns

    if glue not in GLUE_PRECISIONS:
        raise EngineError(f"float glue precision {glue!r}: expected one of {', '.join(GLUE_PRECISIONS)}")
    return _Lowering(fuse_float_patterns(model), layers, glue).run()
