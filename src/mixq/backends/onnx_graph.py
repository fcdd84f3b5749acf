"""The Q/DQ ONNX graph helpers every backend's legalization shares, one of each: a graph index (producers,
consumers, constants), node attributes, constant values (float8e4m3fn included, read without
``onnx.numpy_helper.to_array``), what DequantizeLinear computes for constants, inserting a Q/DQ pair, and
build-time calibration of tensor ranges. Needs ``onnx`` and ``numpy`` (imported when used); ONNX Runtime only
for :func:`calibrated_ranges`."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .errors import EngineError

__all__ = [
    "GraphIndex",
    "attr",
    "attributes",
    "fp8_dtype",
    "is_fp8",
    "fp8_array",
    "constant_tensors",
    "constant_values",
    "dequantize_constant",
    "dequantize_node",
    "remove_nodes",
    "fold_fp8_weights",
    "insert_qdq",
    "tensor_ranges",
    "calibrated_ranges",
]


def attributes(node) -> dict:
    """Every attribute of an ONNX ``node`` by name, each value as ``onnx.helper.get_attribute_value`` gives it
    (int, float, string, tensor or their lists)."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attr(node, name: str, default=None):
    """The value of attribute ``name`` of an ONNX ``node`` (as in :func:`attributes`), or ``default`` when the
    node has none."""
    return attributes(node).get(name, default)


class GraphIndex:
    """Producers, consumers (``(node, input index)`` pairs) and constants of an ONNX graph, built once and read
    many times. Rebuild it after changing the graph."""

    def __init__(self, model):
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in graph.node:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))
        self.inits = {i.name: i for i in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.value = constant_values(model)

    def is_constant(self, name: str) -> bool:
        while name not in self.inits:
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Constant", "Identity"):
                return False
            if node.op_type == "Constant":
                return True
            name = node.input[0]
        return True

    def op(self, name: str) -> str | None:
        node = self.producer.get(name)
        return node.op_type if node is not None else None

    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)


def fp8_dtype():
    """numpy's float8e4m3fn type (ml_dtypes', an onnx dependency; what :func:`fp8_array` returns)."""
    import ml_dtypes

    return ml_dtypes.float8_e4m3fn


def is_fp8(x) -> bool:
    """Whether ``x`` holds float8e4m3fn values: an ONNX TensorProto of type FLOAT8E4M3FN, or an array of
    :func:`fp8_dtype` (as :func:`fp8_array` and :func:`constant_values` give)."""
    if x is None:
        return False
    if hasattr(x, "data_type"):
        from onnx import TensorProto

        return x.data_type == TensorProto.FLOAT8E4M3FN
    return np.asarray(x).dtype == fp8_dtype()


def fp8_array(tensor) -> np.ndarray:
    """The values of a FLOAT8E4M3FN TensorProto as a :func:`fp8_dtype` array of its shape, read from its
    ``raw_data`` or ``int32_data`` (one e4m3 code per element) without ``onnx.numpy_helper.to_array``, whose
    result type for float8 changed across onnx versions (uint8 codes before 1.19)."""
    name = getattr(tensor, "name", "") or "(unnamed)"
    if not is_fp8(tensor):
        raise EngineError(f"tensor {name!r} is not FLOAT8E4M3FN (ONNX data type {tensor.data_type})")
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if tensor.raw_data:
        codes = np.frombuffer(tensor.raw_data, np.uint8)
    elif len(tensor.int32_data):
        codes = np.asarray(tensor.int32_data, np.int64)
        if codes.min() < 0 or codes.max() > 255:
            raise EngineError(f"fp8 tensor {name!r}: int32_data holds values outside the 8-bit codes 0..255")
        codes = codes.astype(np.uint8)
    elif count == 0:
        codes = np.zeros(0, np.uint8)
    else:
        raise EngineError(f"fp8 tensor {name!r} has neither raw_data nor int32_data (external data is not read)")
    if codes.size != count:
        raise EngineError(f"fp8 tensor {name!r}: {codes.size} values for shape {list(shape)}")
    return codes.view(fp8_dtype()).reshape(shape)


def constant_tensors(model) -> dict:
    """The TensorProto of every initializer and Constant node (its ``value``) of ``model``, by tensor name."""
    protos = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        value = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if value is not None:
            protos[n.output[0]] = value
    return protos


def constant_values(model):
    """:func:`mixq.export.constant_resolver` (the value of an initializer or Constant, through Identity nodes),
    with float8e4m3fn constants read by :func:`fp8_array`."""
    from ..export import constant_resolver

    protos = constant_tensors(model)
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input}
    resolve = constant_resolver(model)

    def value(name):
        while name not in protos and name in alias:
            name = alias[name]
        tensor = protos.get(name)
        return fp8_array(tensor) if is_fp8(tensor) else resolve(name)

    return value


def dequantize_constant(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """What DequantizeLinear computes for constants, in float32 as ONNX does: ``(q - zp) * scale`` (integer
    types subtract exactly, in int64; float8 in float32), per channel along ``axis`` when ``scale`` is a vector."""
    kind = np.float32 if is_fp8(q) else np.int64
    q = np.asarray(q).astype(kind)
    scale = np.asarray(scale).astype(np.float32)
    zp = np.zeros_like(scale, kind) if zp is None else np.asarray(zp).astype(kind)
    if scale.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp).astype(np.float32) * scale


def dequantize_node(value, dq) -> np.ndarray:
    """What a DequantizeLinear node of constants computes (:func:`dequantize_constant`); ``value``: a
    :func:`constant_values` resolver of its graph."""
    zp = value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    return dequantize_constant(value(dq.input[0]), value(dq.input[1]), zp, attr(dq, "axis", 1))


def remove_nodes(model, nodes) -> None:
    """Remove ``nodes`` from ``model``'s graph (in place), keeping the order of the others."""
    ids = {id(n) for n in nodes}
    keep = [n for n in model.graph.node if id(n) not in ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def insert_qdq(
    model, tensor: str, scale: np.ndarray, zero_point: np.ndarray, base: str, names: tuple[str, str], users=None
) -> str:
    """Quantize ``tensor`` with a QuantizeLinear/DequantizeLinear pair (per-tensor ``scale`` and ``zero_point``
    arrays, stored as initializers ``{base}_scale``/``{base}_zero_point``; outputs ``{base}_q``/``{base}_dq``;
    node names ``names``) inserted right after the node producing ``tensor`` (first, for a graph input), in
    place. ``users``: the ``(node, input index)`` pairs to read the dequantized tensor; None: every consumer.
    Returns the dequantized tensor's name; where that pair exists already, the users share it."""
    from onnx import helper, numpy_helper

    dq_out = f"{base}_dq"
    g = GraphIndex(model)
    if users is None:
        users = list(g.consumers.get(tensor, []))
    if dq_out not in g.producer:
        model.graph.initializer.extend(
            [numpy_helper.from_array(scale, f"{base}_scale"), numpy_helper.from_array(zero_point, f"{base}_zero_point")]
        )
        params = [f"{base}_scale", f"{base}_zero_point"]
        q = helper.make_node("QuantizeLinear", [tensor, *params], [f"{base}_q"], name=names[0])
        dq = helper.make_node("DequantizeLinear", [f"{base}_q", *params], [dq_out], name=names[1])
        producer = g.producer.get(tensor)
        index = list(model.graph.node).index(producer) + 1 if producer is not None else 0
        model.graph.node.insert(index, dq)
        model.graph.node.insert(index, q)
    for node, i in users:
        node.input[i] = dq_out
    return dq_out


def fold_fp8_weights(model) -> list[str]:
    """Replace each DequantizeLinear of a float8e4m3fn weight initializer by the float32 initializer it
    computes, ``(q - zp) * scale`` (per channel along ``axis``; the same float32 products, bit for bit), in
    place; return the names of the nodes folded. For backends without fp8 kernels (ONNX Runtime, OpenVINO on
    CPU): the weights stay on the fp8 grid, the runtime sees an ordinary float conv/gemm and can use its fast
    float layout instead of dequantizing every run."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    value = constant_values(model)
    folded = []
    for node in model.graph.node:
        w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if not is_fp8(w) or node.input[1] not in inits:
            continue
        weight = dequantize_node(value, node)
        model.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
        folded.append(node)
    if folded:
        remove_nodes(model, folded)
        used = {i for n in model.graph.node for i in n.input}
        dropped = {i for n in folded for i in n.input} - used
        for init in [i for i in model.graph.initializer if i.name in dropped]:
            model.graph.initializer.remove(init)
    return [n.name or n.output[0] for n in folded]


def tensor_ranges(model, tensors: list[str], samples) -> dict[str, tuple[float, float]]:
    """Min/max of ``tensors`` of an ONNX model over ``samples`` (input batches), running the graph literally
    on ONNX Runtime's CPU provider (no graph optimizations). ONNX Runtime is mixq's one way to run an ONNX graph
    on the CPU at build time, so every backend's build-time calibration needs it (a core dependency); without
    it this is one :class:`EngineError` saying so, before any work."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineError(
            f"calibrating {len(tensors)} tensors at build time (calibration_data) runs the graph on ONNX Runtime's "
            "CPU provider, which is not installed here: pip install onnxruntime, or build without calibration data"
        ) from e
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in tensors:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for x in samples:
        values = session.run(tensors, {name: np.ascontiguousarray(x, dtype=np.float32)})
        for t, v in zip(tensors, values, strict=True):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    return {t: (lo[t], hi[t]) for t in tensors}


def calibrated_ranges(model, tensors: list[str], samples, who: str) -> dict[str, tuple[float, float]]:
    """:func:`tensor_ranges` of ``tensors`` over ``samples``, keeping only the finite ranges (a tensor that was
    NaN or infinite on the samples is left unquantized); a failure is an :class:`EngineError` naming ``who``
    (e.g. ``"TensorRT legalization"``)."""
    try:
        ranges = tensor_ranges(model, tensors, samples)
    except EngineError:
        raise
    except Exception as e:  # onnxruntime raises its own types
        raise EngineError(f"{who} could not calibrate {len(tensors)} tensors: {type(e).__name__}: {e}") from e
    return {t: r for t, r in ranges.items() if np.isfinite(r[0]) and np.isfinite(r[1])}
