"""TensorRT's legalization of the backend-neutral Q/DQ graph (:mod:`mixq.export`), so that
:func:`~mixq.backends.tensorrt.check.check` finds nothing and a strongly typed TensorRT network builds it as
the config asks. Each step and why (the rules are cited in :mod:`.check`):

1. Bias: a DequantizeLinear of an int32 bias (ONNX Runtime's form) becomes the float initializer it computes,
   ``q * scale`` in float32 (the same value, bit for bit).
2. Weights: int8 with zero point 0 along the consumer's output channels. Weights that are already so stay
   untouched; others (affine, uint8, another axis) are dequantized and re-quantized symmetrically per output
   channel (``amax / 127``), which moves each value by at most half a new step.
3. Activations: int8 with zero point 0. A pair that is already symmetric int8 keeps its scale; any other
   pair gets ``amax / 127`` with ``amax = max(|lo|, |hi|)`` of its calibrated range, recovered from the exported
   grid as ``[(qmin - zp) * s, (qmax - zp) * s]`` (the calibrated min/max to within half a step). A uint8
   ReLU output ``[0, hi]`` thus gets a step of ``hi / 127`` instead of ``hi / 255``: TensorRT has no unsigned
   int8, so it costs one bit there.
4. Placement: a conv/gemm with a dequantized weight but a float data input gets its input quantized from
   ``calibration_data`` (without data: its weight is dequantized and it runs float, as TensorRT would); one
   with a quantized input but a float weight gets the weight quantized per channel; the float input of a
   residual Add after a quantized conv is quantized from ``calibration_data`` (without data it stays float
   and the placement note says so); a Q/DQ pair no neighbour can run in int8 is removed.
5. fp8 layers (float8e4m3fn Q/DQ, opset 19): TensorRT runs them in fp8 as they are (quantized types INT8
   and FP8, symmetric only), so steps 2-4 keep fp8 where the graph has it: fp8 weights and activations that
   are already symmetric stay untouched, others are re-quantized to fp8 (``amax / 448``), and a tensor the
   placement step quantizes for an fp8 layer gets an fp8 pair. fp8 weights are never re-quantized to int8.
6. fp16 layers: strongly typed networks take precision from tensor types, so the nodes of fp16 layers get
   Cast nodes to float16 in front of them (float16 copies of their weights) and back to float32 after them;
   nodes outside every layer follow their inputs. The graph's input and output stay float32.

Every change is recorded in the layer metadata (``layers[name]["tensorrt"]``: a list of notes) that the
placement report shows.
"""

from __future__ import annotations

import json

import numpy as np

from ...export import LAYERS_METADATA_KEY
from ...primitives import choose_qparams, quantize
from ...spec import FloatType, IntType, PerChannel, QuantSpec
from ..base import EngineError, Legalized, copy_layers, layer_of_node
from ..onnx_graph import attr, calibrated_ranges, dequantize_node, fp8_dtype, insert_qdq, is_fp8, remove_nodes
from .check import (
    TYPE_NEUTRAL_OPS,
    WEIGHTED_OPS,
    GraphIndex,
    check_residual,
    producer_through_bn,
    tensor_types,
    weight_axis,
)

__all__ = ["Legalized", "legalize", "NOTES_KEY", "symmetric_scale"]

NOTES_KEY = "tensorrt"  # layers metadata: what the TensorRT legalization did to the layer
_INT8 = QuantSpec(IntType(8, signed=True), symmetric=True)
_FP8 = QuantSpec(FloatType(), symmetric=True)
QUANTIZED_PRECISIONS = ("int8", "fp8")  # layers asked for a type TensorRT runs quantized


def symmetric_scale(lo: float, hi: float, fp8: bool = False) -> float:
    """The int8 zero-point-0 scale covering ``[lo, hi]`` (``max(|lo|, |hi|) / 127``; fp8: ``/ 448``), mixq's one
    formula."""
    scale, _ = choose_qparams(lo, hi, _FP8 if fp8 else _INT8)
    return float(scale)


def _zero_point(shape, fp8: bool) -> np.ndarray:
    """Zeros of the quantized type: int8, or float8e4m3fn (ml_dtypes, what ``onnx.numpy_helper`` stores)."""
    zeros = np.zeros(shape, np.int8)
    return zeros.view(fp8_dtype()) if fp8 else zeros  # e4m3 code 0 is +0.0


def legalize(model, layers: dict, calibration_data=()) -> Legalized:
    """A copy of ``model`` that TensorRT builds as asked (see the module doc); ``model`` is not changed.
    ``calibration_data``: sample input batches (float32 arrays) for tensors the config leaves float."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = copy_layers(layers)
    notes = _Notes(layers)
    _float_biases(out, notes)
    _symmetric_weights(out, notes)
    _symmetric_activations(out, notes)
    _fix_weighted_inputs(out, notes, calibration_data)
    _fix_residuals(out, notes, calibration_data)
    _drop_unfusable(out, notes)
    _cast_fp16(out, layers, notes)
    _prune_unused(out)
    for prop in out.metadata_props:
        if prop.key == LAYERS_METADATA_KEY:
            prop.value = json.dumps(layers)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # a bug here, not the user's: say where it came from
        raise EngineError(f"TensorRT legalization produced an invalid ONNX graph: {e}") from e
    return Legalized(out, layers)


class _Notes:
    def __init__(self, layers: dict):
        self.layers = layers

    def add(self, node_name: str, text: str) -> None:
        layer = layer_of_node(node_name, self.layers)
        if layer is not None:
            entry = self.layers[layer].setdefault(NOTES_KEY, [])
            if text not in entry:
                entry.append(text)


def _initializer(model, array: np.ndarray, name: str) -> str:
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _scope(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0] if "/" in node_name else ""


def _dequantize(g: GraphIndex, dq) -> np.ndarray:
    """What a weight/bias DequantizeLinear computes (:func:`..onnx_graph.dequantize_node`)."""
    return dequantize_node(g.value, dq)


def _prune_unused(model) -> None:
    """Drop constants (initializers, Constant/Identity nodes) that nothing reads after the rewrites."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("Constant", "Identity") and n.output[0] not in used]
        if not dead:
            break
        remove_nodes(model, dead)
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def _float_biases(model, notes: _Notes) -> None:
    g = GraphIndex(model)
    done = []
    for dq in g.nodes:
        if dq.op_type != "DequantizeLinear" or not g.is_constant(dq.input[0]):
            continue
        users = g.consumers.get(dq.output[0], [])
        if not users or not all(u.op_type in ("Conv", "ConvTranspose", "Gemm") and i == 2 for u, i in users):
            continue
        name = _initializer(model, _dequantize(g, dq), f"{dq.output[0]}_float")
        for user, i in users:
            user.input[i] = name
            notes.add(user.name, "bias kept float (TensorRT dequantizes no int32 bias)")
        done.append(dq)
    remove_nodes(model, done)


def _weight_ok(g: GraphIndex, dq, axis: int | None) -> bool:
    q, scale = g.value(dq.input[0]), g.value(dq.input[1])
    zp = g.value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if is_fp8(q):  # fp8 (opset 19): the zero point may be left out (0)
        if g.opset() < 19 or (zp is not None and (not is_fp8(zp) or np.any(zp.astype(np.float32) != 0))):
            return False
    elif q.dtype != np.int8 or zp is None or zp.dtype != np.int8 or np.any(zp != 0):
        return False
    if scale.dtype != np.float32 or not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        return False
    if scale.size == 1:
        return True
    return axis is not None and attr(dq, "axis", 1) % q.ndim == axis


def _quantize_weight(model, w: np.ndarray, axis: int | None, base: str, fp8: bool = False) -> tuple[str, str, str]:
    """Symmetric int8 (``fp8``: float8e4m3fn) per-channel (along ``axis``; per tensor when None) initializers for
    float ``w``: :func:`mixq.primitives.choose_qparams` and :func:`mixq.primitives.quantize`, mixq's one formula."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    dtype = FloatType() if fp8 else IntType(8, signed=True)
    if axis is None:
        scale, _ = choose_qparams(float(w.min(initial=0.0)), float(w.max(initial=0.0)), _FP8 if fp8 else _INT8)
    else:
        moved = t.movedim(axis, 0).reshape(w.shape[axis], -1)
        lo, hi = moved.min(dim=1).values.clamp(max=0), moved.max(dim=1).values.clamp(min=0)
        scale, _ = choose_qparams(lo, hi, QuantSpec(dtype, symmetric=True, granularity=PerChannel(axis)))
    scale = torch.as_tensor(scale, dtype=torch.float32)
    q = quantize(t, scale, torch.zeros_like(scale, dtype=torch.int32), dtype, axis)
    q = q.view(torch.uint8).numpy().view(fp8_dtype()) if fp8 else q.numpy().astype(np.int8)
    kind = "fp8" if fp8 else "int8"
    scale = scale.numpy().astype(np.float32)
    return (
        _initializer(model, q, f"{base}_{kind}"),
        _initializer(model, scale, f"{base}_{kind}_scale"),
        _initializer(model, _zero_point(scale.shape, fp8), f"{base}_{kind}_zero_point"),
    )


def _set_axis(node, axis: int | None) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))


def _symmetric_weights(model, notes: _Notes) -> None:
    g = GraphIndex(model)
    for dq in g.nodes:
        if dq.op_type != "DequantizeLinear" or not g.is_constant(dq.input[0]):
            continue
        users = g.consumers.get(dq.output[0], [])
        rank = g.value(dq.input[0]).ndim
        axes = {weight_axis(u, i, rank) for u, i in users}
        axis = next(iter(axes)) if len(axes) == 1 else None
        if _weight_ok(g, dq, axis):
            continue
        w = _dequantize(g, dq)
        fp8 = is_fp8(g.value(dq.input[0]))
        per_channel = axis is not None  # TensorRT's recommendation for weights: per channel
        names = _quantize_weight(model, w, axis if per_channel else None, dq.output[0], fp8)
        dq.input[:] = list(names)
        _set_axis(dq, axis if per_channel else None)
        for user, _ in users:
            notes.add(user.name, f"weights re-quantized to symmetric {'fp8' if fp8 else 'int8'} per output channel")


def _activation_range(g: GraphIndex, q) -> tuple[float, float, bool]:
    """(lo, hi, already_legal) of an activation QuantizeLinear's grid."""
    scale = float(g.value(q.input[1]).reshape(-1)[0])
    zp = g.value(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    if is_fp8(zp):  # fp8: symmetric by construction; legal with zero point 0 and a float32 scale
        top = FloatType().max * scale
        legal = g.opset() >= 19 and not np.any(zp.astype(np.float32) != 0)
        return -top, top, legal and g.value(q.input[1]).dtype == np.float32
    info = np.iinfo(zp.dtype) if np.issubdtype(zp.dtype, np.integer) else None
    if info is None:
        raise EngineError(f"{q.name}: quantized type {zp.dtype} is not an integer type")
    z = int(zp.reshape(-1)[0])
    legal = zp.dtype == np.int8 and z == 0 and g.value(q.input[1]).dtype == np.float32
    return (info.min - z) * scale, (info.max - z) * scale, legal


def _symmetric_activations(model, notes: _Notes) -> None:
    g = GraphIndex(model)
    for q in g.nodes:
        if q.op_type != "QuantizeLinear" or g.is_constant(q.input[0]):
            continue
        if g.value(q.input[1]) is None or (len(q.input) > 2 and q.input[2] and g.value(q.input[2]) is None):
            continue  # not a constant: check() names it, nothing to derive a range from
        lo, hi, legal = _activation_range(g, q)
        if legal:
            continue
        fp8 = is_fp8(g.value(q.input[2])) if len(q.input) > 2 and q.input[2] else False
        scale = _initializer(model, np.array(symmetric_scale(lo, hi, fp8), np.float32), f"{q.output[0]}_sym_scale")
        zp = _initializer(model, _zero_point((), fp8), f"{q.output[0]}_sym_zero_point")
        for node in [q, *(u for u, _ in g.consumers.get(q.output[0], []) if u.op_type == "DequantizeLinear")]:
            node.input[:] = [node.input[0], scale, zp]
            _set_axis(node, None)
        kind = "fp8" if fp8 else "int8"
        notes.add(q.name, f"activation re-quantized to symmetric {kind} from its calibrated range")


def _insert_qdq(model, tensor: str, rng: tuple[float, float], users, name_from: str, fp8: bool = False) -> None:
    """Quantize ``tensor`` (symmetric int8, or fp8, over ``rng``) for the ``(node, index)`` pairs in ``users``."""
    base = f"{tensor}_trt{'_fp8' if fp8 else ''}"
    prefix = _scope(name_from)
    # Names end in the op type like the exporter's, so the placement report attributes them without the graph.
    names = (f"{prefix}/QuantizeLinear_trt_{tensor}", f"{prefix}/DequantizeLinear_trt_{tensor}")
    scale = np.array(symmetric_scale(*rng, fp8=fp8), np.float32)
    insert_qdq(model, tensor, scale, _zero_point((), fp8), base, names, users)


def _fix_weighted_inputs(model, notes: _Notes, samples) -> None:
    """Conv/gemm nodes with one of data input and weight dequantized: quantize the other (see module doc)."""
    g = GraphIndex(model)
    wanted: dict[str, list] = {}  # float data input -> (node, index) pairs to rewire
    fp8_inputs: set[str] = set()  # those read by fp8 layers: quantized to fp8
    dequantize_weights = []
    quantized_weights: set[str] = set()
    for node in g.nodes:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or g.is_constant(node.input[0]):
            continue
        layer = layer_of_node(node.name, notes.layers)
        if layer is None or notes.layers[layer].get("precision") not in QUANTIZED_PRECISIONS:
            continue  # a float or fp16 layer reading a quantized tensor runs as asked: nothing to fix
        fp8 = notes.layers[layer]["precision"] == "fp8"
        data, weight = g.dequantized(node.input[0]), g.dequantized(node.input[1])
        if weight is not None and data is None:
            wanted.setdefault(node.input[0], []).append((node, 0))
            if fp8:
                fp8_inputs.add(node.input[0])
            dequantize_weights.append((node, weight))
        elif data is not None and weight is None and g.is_constant(node.input[1]):
            w = g.value(node.input[1]).astype(np.float32)
            axis = weight_axis(node, 1, w.ndim)
            dq_out = f"{node.input[1]}_{'fp8' if fp8 else 'int8'}_dq"
            if dq_out not in quantized_weights:  # a weight the exporter shares between layers is quantized once
                q, s, z = _quantize_weight(model, w, axis, node.input[1], fp8)
                model.graph.node.insert(
                    list(model.graph.node).index(node),
                    _make_dq([q, s, z], dq_out, f"{_scope(node.name)}/DequantizeLinear_trt_weight", axis),
                )
                quantized_weights.add(dq_out)
            node.input[1] = dq_out
            notes.add(node.name, "weights quantized per channel at build time (the config left them float)")
    ranges = _calibrate(model, list(wanted), samples) if wanted and samples else {}
    for node, weight_dq in dequantize_weights:
        kind = "fp8" if node.input[0] in fp8_inputs else "int8"
        if node.input[0] in ranges:
            notes.add(node.name, f"input quantized from calibration_data so that TensorRT runs it {kind}")
            continue
        node.input[1] = _initializer(model, _dequantize(g, weight_dq), f"{weight_dq.output[0]}_float")
        notes.add(node.name, f"runs float: its input is float and TensorRT has no {kind} weight-only conv/gemm here")
    for tensor, users in wanted.items():
        if tensor in ranges:
            fp8 = tensor in fp8_inputs
            _insert_qdq(model, tensor, ranges[tensor], users, users[0][0].name, fp8)


def _fix_residuals(model, notes: _Notes, samples) -> None:
    """The float inputs of residual adds after quantized convs: quantized from calibration data, or noted."""
    g = GraphIndex(model)
    wanted: dict[str, list] = {}
    fp8_adds: set[str] = set()  # residual inputs of adds fused into an fp8 conv: quantized to fp8
    for node in g.nodes:
        if node.op_type == "Add" and check_residual(g, node):
            fp8 = _fused_into_fp8(g, node, notes.layers)
            for tensor in _residual_tensors(g, node):
                wanted.setdefault(tensor, []).extend((node, i) for i, t in enumerate(node.input) if t == tensor)
                if fp8:
                    fp8_adds.add(tensor)
    ranges = _calibrate(model, list(wanted), samples) if wanted and samples else {}
    for tensor, users in wanted.items():
        producer = g.producer[tensor].name
        if tensor in ranges:
            fp8 = tensor in fp8_adds
            _insert_qdq(model, tensor, ranges[tensor], users, producer, fp8)
            kind = "fp8" if fp8 else "int8"
            notes.add(producer, f"output quantized from calibration_data: it is the {kind} residual input of an add")
        else:
            notes.add(
                producer,
                "its output feeds a residual add in float, which keeps the add out of the int8 conv; "
                "pass calib_data_loader=... so the build calibrates it",
            )


def _fused_into_fp8(g: GraphIndex, add, layers: dict) -> bool:
    """Whether a residual ``add`` follows a quantized conv/gemm of an fp8 layer."""
    for t in add.input:
        if t in g.producer and not g.is_constant(t):
            node = producer_through_bn(g, t)
            layer = layer_of_node(node.name, layers) if g.quantized_weighted(node) else None
            if layer is not None and layers[layer].get("precision") == "fp8":
                return True
    return False


def _make_dq(inputs, output: str, name: str, axis: int | None):
    from onnx import helper

    return helper.make_node(
        "DequantizeLinear", inputs, [output], name=name, **({"axis": axis} if axis is not None else {})
    )


def _residual_tensors(g: GraphIndex, add) -> list[str]:
    """The float inputs of a residual Add to quantize: all but the first-produced quantized conv output."""
    order = {id(n): i for i, n in enumerate(g.nodes)}
    floats = [t for t in add.input if t and not g.is_constant(t) and g.dequantized(t) is None]
    fusable = [t for t in floats if g.quantized_weighted(producer_through_bn(g, t))]
    keep = min(fusable, key=lambda t: order[id(g.producer[t])])
    return [t for t in floats if t != keep]


def _calibrate(model, tensors: list[str], samples) -> dict[str, tuple[float, float]]:
    return calibrated_ranges(model, tensors, samples, "TensorRT legalization")


def _drop_unfusable(model, notes: _Notes) -> None:
    g = GraphIndex(model)
    drop = []
    for q in g.nodes:
        if q.op_type != "QuantizeLinear" or g.is_constant(q.input[0]):
            continue
        dqs = [u for u, _ in g.consumers.get(q.output[0], [])]
        if not dqs or any(u.op_type != "DequantizeLinear" for u in dqs):
            continue
        if g.int8_producer(q.input[0]) or any(g.int8_consumer(dq.output[0]) for dq in dqs):
            continue
        for dq in dqs:
            for user, i in g.consumers.get(dq.output[0], []):
                user.input[i] = q.input[0]
            for out in model.graph.output:
                if out.name == dq.output[0]:
                    raise EngineError(f"{dq.name}: a quantized tensor is the graph output; TensorRT needs float")
        drop += [q, *dqs]
        notes.add(q.name, "Q/DQ pair removed: no neighbour runs int8 in TensorRT, so it would only add two kernels")
    remove_nodes(model, drop)


def _cast_fp16(model, layers: dict, notes: _Notes) -> None:
    """Cast the nodes of fp16 layers to float16 in the graph (see the module doc, step 5)."""
    import onnx
    from onnx import helper, numpy_helper

    fp16 = {name for name, info in layers.items() if info.get("precision") == "fp16"}
    if not fp16:
        return
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16  # noqa: N806
    g = GraphIndex(model)
    types = tensor_types(model)
    half_tensors: set[str] = set()
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def as_type(tensor: str, to: int, scope: str) -> str:
        if (tensor, to) in casts:
            return casts[(tensor, to)]
        if to == HALF and tensor in g.inits:
            array = numpy_helper.to_array(g.inits[tensor]).astype(np.float16)
            out = _initializer(model, array, f"{tensor}_fp16")
        else:
            out = f"{tensor}_to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [tensor], [out], to=to, name=f"{scope}/Cast_{out}"))
        casts[(tensor, to)] = out
        return out

    for node in g.nodes:
        if _runs_fp16(node, g, layers, fp16, types, half_tensors):
            for i, name in enumerate(node.input):
                if name and types.get(name) == FLOAT and name not in half_tensors:
                    node.input[i] = as_type(name, HALF, _scope(node.name))
            half_tensors.update(o for o in node.output if types.get(o) == FLOAT)
            notes.add(node.name, "cast to float16 in the graph (strongly typed network)")
        else:
            for i, name in enumerate(node.input):
                if name in half_tensors:
                    node.input[i] = as_type(name, FLOAT, _scope(node.name))
        new_nodes.append(node)
    for out in model.graph.output:
        if out.name in half_tensors:  # the engine's output stays float32
            inner = f"{out.name}_fp16"
            for node in new_nodes:
                node.input[:] = [inner if i == out.name else i for i in node.input]
                node.output[:] = [inner if o == out.name else o for o in node.output]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=f"Cast_{out.name}"))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def _runs_fp16(node, g: GraphIndex, layers: dict, fp16: set, types: dict, half_tensors: set) -> bool:
    import onnx

    if node.op_type in TYPE_NEUTRAL_OPS:
        return False
    layer = layer_of_node(node.name, layers)
    if layer is not None:
        return layer in fp16
    # Outside every layer (flatten, residual add, softmax): float16 when every activation input is.
    activations = [
        i
        for i in node.input
        if i and not g.is_constant(i) and (i in half_tensors or types.get(i) == onnx.TensorProto.FLOAT)
    ]
    return bool(activations) and all(i in half_tensors for i in activations)
