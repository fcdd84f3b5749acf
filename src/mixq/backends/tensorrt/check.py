"""What TensorRT (10.12+ and 11, strongly typed, explicit quantization) accepts and fuses, checked on an ONNX
graph with ``onnx`` alone: :func:`check` lists every violation with the node and the rule it breaks.

Two kinds of rule. ``rejected``: TensorRT's ONNX parser or builder refuses the graph, or builds something else
than it says. ``placement``: TensorRT builds it, but cannot run the layer the way it was asked (int8 or fp16).
The rules and where TensorRT documents them:

* Quantize/Dequantize layers (``IQuantizeLayer``/``IDequantizeLayer`` in ``NvInfer.h``, TensorRT 11.1; the
  operator pages Quantize/Dequantize of the TensorRT Operators Reference): only symmetric quantization (zero
  point all zeros), quantized types INT8/FP8/INT4/FP4 (mixq uses int8 and fp8 e4m3fn, the latter from
  ONNX opset 19 on: float8e4m3fn zero points and weights), a build-time constant
  scale with strictly positive coefficients, per-channel scales only for weights (a DequantizeLayer input
  rooted at a constant), and the 1-D scale as long as the quantization axis.
* Explicit quantization, "Q/DQ Layer-Placement Recommendations"
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html):
  quantize all inputs of weighted operations (Convolution, Deconvolution, GEMM); quantize the residual input
  of an element-wise addition that follows a weighted operation, since the precision of that input decides
  the precision of the fused output; a Q/DQ pair that no neighbour can absorb only adds two kernels.
* Strong typing (TensorRT 10.x -> 11.x migration guide, "Strongly Typed Networks Are Now Required"): layer
  precision and builder precision flags are gone; a layer computes in the type of its input tensors, so a
  layer asked for fp16 must read float16 tensors (Cast nodes and float16 weights in the graph).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ...export import LAYERS_METADATA_KEY
from .. import onnx_graph
from ..base import layer_of_node
from ..onnx_graph import attr

__all__ = [
    "Problem",
    "Rule",
    "RULES",
    "check",
    "check_residual",
    "GraphIndex",
    "WEIGHTED_OPS",
    "model_layers",
    "producer_through_bn",
    "tensor_types",
    "weight_axis",
]


@dataclass(frozen=True)
class Rule:
    kind: str  # "rejected" | "placement"
    text: str


RULES = {
    "zero-point": Rule("rejected", "a Q/DQ zero point is a constant of zeros (TensorRT quantizes symmetrically only)"),
    "quantized-type": Rule(
        "rejected", "the quantized type is int8 (or float8e4m3fn, opset >= 19): no uint8, int16 or int32 Q/DQ"
    ),
    "scale": Rule("rejected", "a Q/DQ scale is a float constant with finite, strictly positive coefficients"),
    "per-channel-activation": Rule("rejected", "per-channel scales only on weights; activations are per tensor"),
    "weight-axis": Rule(
        "rejected", "a per-channel weight scale runs along the output channels of its consumer, one per channel"
    ),
    "float-bias": Rule("rejected", "a conv/gemm bias is float: TensorRT's DequantizeLayer takes no int32 input"),
    "dq-source": Rule("rejected", "a DequantizeLinear reads a QuantizeLinear output or a quantized constant"),
    "q-consumer": Rule("rejected", "a QuantizeLinear output feeds DequantizeLinear nodes only, never the graph output"),
    "fp16-in-graph": Rule(
        "placement", "a layer asked for fp16 reads float16 tensors (strongly typed: precision comes from tensor types)"
    ),
    "weighted-inputs": Rule(
        "placement", "an int8/fp8 Conv/ConvTranspose/Gemm/MatMul has its data input and its weight both dequantized"
    ),
    "residual-input": Rule(
        "placement", "an Add fed straight by a quantized conv/gemm has its other input dequantized (residual input)"
    ),
    "unfusable-qdq": Rule(
        "placement", "a Q/DQ pair has a neighbour that runs int8: a quantized producer or an int8 consumer"
    ),
}

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops TensorRT moves a DequantizeLinear forward through / a QuantizeLinear backward through (Q/DQ propagation:
# max pooling and shuffles commute with quantization).
COMMUTING_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice"})
# Ops whose output a QuantizeLinear fuses into (an int8 output), reached back through activations TensorRT fuses.
INT8_PRODUCERS = WEIGHTED_OPS | {"Add", "AveragePool", "GlobalAveragePool"}
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "BatchNormalization"})
# Ops that consume an int8 tensor from a DequantizeLinear (quantizable layers, a requantization, a concat).
INT8_CONSUMERS = WEIGHTED_OPS | {"Add", "AveragePool", "GlobalAveragePool", "QuantizeLinear", "Concat"}
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Nodes that are bookkeeping, not computation: not required to read float16 in an fp16 layer.
TYPE_NEUTRAL_OPS = QDQ_OPS | {"Cast", "Constant", "Identity", "Shape"}


@dataclass(frozen=True)
class Problem:
    """One violation: the ONNX node, the rule (a key of :data:`RULES`) and what is wrong there."""

    node: str
    rule: str
    detail: str

    @property
    def kind(self) -> str:
        return RULES[self.rule].kind

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.detail}"


class GraphIndex(onnx_graph.GraphIndex):
    """:class:`mixq.backends.onnx_graph.GraphIndex` and what TensorRT fuses: dequantized inputs through
    commuting ops, int8 producers and consumers."""

    def dequantized(self, name: str):
        """The DequantizeLinear that ``name`` comes from, directly or through commuting ops (else None)."""
        node = self.producer.get(name)
        while node is not None and node.op_type in COMMUTING_OPS:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def quantized_weighted(self, node) -> bool:
        return node.op_type in WEIGHTED_OPS and len(node.input) > 1 and self.dequantized(node.input[0]) is not None

    def int8_producer(self, name: str) -> bool:
        node = self.producer.get(name)
        while node is not None and node.op_type in COMMUTING_OPS | FUSED_ACTIVATIONS:
            node = self.producer.get(node.input[0])
        return node is not None and node.op_type in INT8_PRODUCERS

    def int8_consumer(self, name: str) -> bool:
        for node, _ in self.consumers.get(name, []):
            if node.op_type in INT8_CONSUMERS:
                return True
            if node.op_type in COMMUTING_OPS and self.int8_consumer(node.output[0]):
                return True
        return False


def weight_axis(node, input_index: int, rank: int) -> int | None:
    """The output-channel axis of the weight at ``input_index`` of a weighted ``node`` (None: not a weight)."""
    if input_index != 1:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return None


def _elem_type(g: GraphIndex, name: str) -> int | None:
    import onnx

    if name in g.inits:
        return g.inits[name].data_type
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant":
        return node.attribute[0].t.data_type
    if node is not None and node.op_type == "Identity":
        return _elem_type(g, node.input[0])
    return onnx.TensorProto.UNDEFINED


def _check_qdq(g: GraphIndex, node) -> list[Problem]:
    import onnx

    out: list[Problem] = []
    name = node.name or node.output[0]
    q = node.op_type == "QuantizeLinear"
    scale = g.value(node.input[1]) if len(node.input) > 1 else None
    has_zp = len(node.input) > 2 and node.input[2]
    zp = g.value(node.input[2]) if has_zp else None
    zp_type = _elem_type(g, node.input[2]) if has_zp else None
    feeds_bias = any(
        c.op_type in ("Conv", "ConvTranspose", "Gemm") and i == 2 for c, i in g.consumers.get(node.output[0], [])
    )
    allowed = {onnx.TensorProto.INT8} | ({onnx.TensorProto.FLOAT8E4M3FN} if g.opset() >= 19 else set())
    if has_zp:
        qtype = zp_type
    elif q:
        qtype = onnx.TensorProto.UINT8  # ONNX: a QuantizeLinear without zero point outputs uint8
    else:
        qtype = _elem_type(g, node.input[0]) if g.is_constant(node.input[0]) else None  # else: its Q says
    if feeds_bias and qtype == onnx.TensorProto.INT32:
        out.append(Problem(name, "float-bias", "dequantizes an int32 bias; store the bias in float"))
    elif qtype is not None and qtype not in allowed:
        type_name = onnx.TensorProto.DataType.Name(qtype) if qtype else "non-constant"
        why = " (no zero point: ONNX makes the output uint8)" if q and not has_zp else ""
        fp8 = " or FLOAT8E4M3FN (opset >= 19)" if qtype == onnx.TensorProto.FLOAT8E4M3FN or g.opset() >= 19 else ""
        out.append(Problem(name, "quantized-type", f"quantized type {type_name}, expected INT8{fp8}{why}"))
    if has_zp and zp is None:
        out.append(Problem(name, "zero-point", "zero point is not a constant"))
    elif zp is not None and np.any(zp.astype(np.float64) != 0):
        out.append(Problem(name, "zero-point", f"zero point {zp.ravel()[:4].tolist()} is not 0"))
    if scale is None:
        out.append(Problem(name, "scale", "scale is not a constant"))
        return out
    if scale.dtype not in (np.float32, np.float16):
        out.append(Problem(name, "scale", f"scale dtype {scale.dtype}, expected float32"))
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        out.append(Problem(name, "scale", f"scale {scale.ravel()[:4].tolist()} is not finite and > 0"))
    weight = not q and g.is_constant(node.input[0])
    if scale.size > 1 and not weight:
        out.append(Problem(name, "per-channel-activation", f"{scale.size} scales on an activation"))
    elif scale.size > 1:
        out.extend(_check_weight_axis(g, node, name, scale.size))
    return out


def _check_weight_axis(g: GraphIndex, dq, name: str, channels: int) -> list[Problem]:
    w = g.value(dq.input[0])
    axis = attr(dq, "axis", 1) % max(w.ndim, 1)
    out = []
    for consumer, index in g.consumers.get(dq.output[0], []):
        want = weight_axis(consumer, index, w.ndim)
        if want is not None and axis != want:
            out.append(
                Problem(name, "weight-axis", f"axis {axis}, but {consumer.name}'s output channels are on axis {want}")
            )
    if w.shape[axis] != channels:
        out.append(Problem(name, "weight-axis", f"{channels} scales for {w.shape[axis]} channels on axis {axis}"))
    return out


def _check_pairs(g: GraphIndex, node) -> list[Problem]:
    name = node.name or node.output[0]
    if node.op_type == "QuantizeLinear":
        users = g.consumers.get(node.output[0], [])
        if node.output[0] in g.graph_outputs or any(u.op_type != "DequantizeLinear" for u, _ in users):
            return [Problem(name, "q-consumer", "its int8 output reaches a node other than DequantizeLinear")]
        if g.is_constant(node.input[0]):
            return []
        if not (g.int8_producer(node.input[0]) or any(g.int8_consumer(u.output[0]) for u, _ in users)):
            return [Problem(name, "unfusable-qdq", "neither its producer nor its consumers run int8")]
        return []
    if g.is_constant(node.input[0]) or g.op(node.input[0]) == "QuantizeLinear":
        return []
    return [Problem(name, "dq-source", f"reads {node.input[0]!r}, which no QuantizeLinear produces")]


def _check_weighted(g: GraphIndex, node, layers: dict) -> list[Problem]:
    if len(node.input) < 2:
        return []
    layer = layer_of_node(node.name, layers)
    if layers and (layer is None or layers[layer].get("precision") not in ("int8", "fp8")):
        return []  # not asked for int8/fp8: a dequantized input is just a float input to it
    data = g.dequantized(node.input[0]) is not None
    weight = g.dequantized(node.input[1]) is not None
    if data == weight:
        return []
    which = "weight" if weight else "data input"
    other = "data input" if weight else "weight"
    return [Problem(node.name, "weighted-inputs", f"its {which} is dequantized but its {other} is float")]


def check_residual(g: GraphIndex, node) -> list[Problem]:
    inputs = [i for i in node.input if i and not g.is_constant(i)]
    direct = [i for i in inputs if i in g.producer and g.quantized_weighted(producer_through_bn(g, i))]
    if not direct:
        return []
    others = [i for i in inputs if g.dequantized(i) is None]
    if len(others) <= 1:
        return []  # the one float input is a conv the add fuses into; every other input is int8
    return [
        Problem(node.name, "residual-input", f"inputs {others} are float; the one not fused into a conv must be int8")
    ]


def producer_through_bn(g: GraphIndex, name: str):
    """The node producing ``name``, looking through one BatchNormalization (TensorRT fuses it into the conv)."""
    node = g.producer[name]
    if node.op_type == "BatchNormalization":
        node = g.producer.get(node.input[0], node)
    return node


def _check_fp16(g: GraphIndex, types: dict[str, int], layers: dict) -> list[Problem]:
    import onnx

    out = []
    for node in g.nodes:
        layer = layer_of_node(node.name, layers)
        if layer is None or layers[layer].get("precision") != "fp16" or node.op_type in TYPE_NEUTRAL_OPS:
            continue
        fp32 = [i for i in node.input if i and types.get(i) == onnx.TensorProto.FLOAT]
        if fp32:
            out.append(Problem(node.name, "fp16-in-graph", f"layer {layer!r} asks fp16 but reads float32 {fp32}"))
    return out


def tensor_types(model) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; unknown types are not checked
        inferred = model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            types[n.output[0]] = n.attribute[0].t.data_type
    return types


def model_layers(model) -> dict:
    """The ``mixq.layers`` metadata of an exported model ({} if absent)."""
    for prop in model.metadata_props:
        if prop.key == LAYERS_METADATA_KEY:
            return json.loads(prop.value)
    return {}


def check(model) -> list[Problem]:
    """Every rule of :data:`RULES` on ``model`` (an ``onnx.ModelProto``), in graph order; [] when TensorRT
    builds it as asked. Needs only ``onnx`` and ``numpy``."""
    g = GraphIndex(model)
    layers = model_layers(model)
    problems: list[Problem] = []
    for node in g.nodes:
        if node.op_type in QDQ_OPS:
            problems += _check_qdq(g, node)
            problems += _check_pairs(g, node)
        elif node.op_type in WEIGHTED_OPS:
            problems += _check_weighted(g, node, layers)
        elif node.op_type == "Add":
            problems += check_residual(g, node)
    if any(info.get("precision") == "fp16" for info in layers.values()):
        problems += _check_fp16(g, tensor_types(model), layers)
    return problems
