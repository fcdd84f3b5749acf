"""ONNX Runtime's legalization of the backend-neutral Q/DQ graph.

ORT runs a conv in int8 (QLinearConv) only when its output goes through a QuantizeLinear. A config that
quantizes conv inputs and weights but not outputs (the NNI tutorial's style) leaves every conv whose output
feeds a residual Add, a BatchNorm that could not be folded, or the graph output in float, with Q/DQ glue
around it: slower than float. OpenVINO legalizes such graphs itself; for ORT, this pass calibrates those conv
outputs at build time on sample inputs the user gives (``BuildOptions.calibration_data``) and inserts a
QuantizeLinear/DequantizeLinear pair (uint8, affine, min/max range) after each, which turns them into
QLinearConv and the residual adds into QLinearAdd. The engine then rounds those tensors once more than
the fake-quant model does (half a step of each, the price of running them in int8); the placement report
says which layers were calibrated this way.
"""

from __future__ import annotations

import numpy as np

from ..primitives import choose_qparams
from ..spec import IntType, PerTensor, QuantSpec
from .base import EngineError, layer_of_node, tensor_ranges

__all__ = ["float_output_convs", "quantize_conv_outputs", "LEGALIZED_KEY"]

LEGALIZED_KEY = "calibrated_at_build"  # layers metadata: the output range came from build-time calibration
_ACTIVATION = QuantSpec(IntType(8, signed=False), symmetric=False, granularity=PerTensor())


def float_output_convs(model) -> list:
    """Conv nodes with dequantized input and weight whose output is not quantized: consumed by something
    other than a QuantizeLinear, directly or through one Relu."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}

    def quantized(tensor: str) -> bool:
        users = consumers.get(tensor, [])
        if tensor in graph_outputs or not users:
            return False
        for u in users:
            if u.op_type == "QuantizeLinear":
                continue
            if u.op_type == "Relu" and quantized(u.output[0]):
                continue
            return False
        return True

    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        if node.output[0] in graph_outputs:
            continue  # renaming a graph output would change the engine's interface
        x, w = producers.get(node.input[0]), producers.get(node.input[1])
        dequantized = x is not None and w is not None and x.op_type == w.op_type == "DequantizeLinear"
        if dequantized and not quantized(node.output[0]):
            out.append(node)
    return out


def quantize_conv_outputs(model, layers: dict, samples) -> list[str]:
    """Insert a calibrated Q/DQ pair after every conv of :func:`float_output_convs` (in place); return the
    layers whose outputs were calibrated. ``samples``: input batches (float32 arrays)."""
    from onnx import helper, numpy_helper

    convs = float_output_convs(model)
    if not convs or not samples:
        return []
    try:
        ranges = tensor_ranges(model, [c.output[0] for c in convs], samples)
    except Exception as e:  # onnxruntime raises its own types
        raise EngineError(f"ONNX Runtime legalization could not calibrate conv outputs: {type(e).__name__}: {e}") from e
    done = []
    for conv in convs:
        tensor = conv.output[0]
        lo, hi = ranges[tensor]
        if not (np.isfinite(lo) and np.isfinite(hi)):
            continue
        scale, zero_point = choose_qparams(lo, hi, _ACTIVATION)
        base = f"{tensor}_legalized"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(float(scale), np.float32), f"{base}_scale"),
                numpy_helper.from_array(np.array(int(zero_point), np.uint8), f"{base}_zero_point"),
            ]
        )
        for node in model.graph.node:  # rewire the conv's consumers to the dequantized tensor
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = f"{base}_dq"
        prefix = conv.name.rsplit("/", 1)[0]  # keeps the layer's scope, so the report attributes the pair
        q = helper.make_node(
            "QuantizeLinear",
            [tensor, f"{base}_scale", f"{base}_zero_point"],
            [f"{base}_q"],
            name=f"{prefix}/LegalQ_{tensor}",
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{base}_q", f"{base}_scale", f"{base}_zero_point"],
            [f"{base}_dq"],
            name=f"{prefix}/LegalDQ_{tensor}",
        )
        index = list(model.graph.node).index(conv)
        model.graph.node.insert(index + 1, dq)
        model.graph.node.insert(index + 1, q)
        layer = layer_of_node(conv.name, layers)
        if layer is not None:
            done.append(layer)
    return done
