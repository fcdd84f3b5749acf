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

fp8 (float8e4m3fn, opset 19) layers: ORT's CPU provider has no fp8 conv/gemm kernels, but its fp8
QuantizeLinear/DequantizeLinear round exactly as the fake-quant model does (round to nearest even, saturating
at +-448; benchmarks/results/fp8-cpu-backends.md), so the engine keeps the fp8 Q/DQ pairs and runs the layer
in fp32 between them: emulated, numerically the fake-quant model. Some ORT rewrites must be off for such graphs
(:data:`FP8_UNSAFE_REWRITES`).
"""

from __future__ import annotations

import numpy as np

from ...primitives import choose_qparams
from ...spec import IntType, PerTensor, QuantSpec
from ..base import layer_of_node
from ..onnx_graph import GraphIndex, calibrated_ranges, constant_tensors, insert_qdq, is_fp8

__all__ = ["float_output_convs", "quantize_conv_outputs", "LEGALIZED_KEY", "has_fp8", "FP8_UNSAFE_REWRITES"]

LEGALIZED_KEY = "calibrated_at_build"  # layers metadata: the output range came from build-time calibration
# ORT 1.32 rewrites that are wrong for fp8 graphs (measured in benchmarks/results/fp8-cpu-backends.md):
# ReluQuantRewrite removes a Relu feeding a QuantizeLinear as if the quantized type clipped at the zero point,
# true for uint8/int8 with that zero point, not for float8: every fp8 conv+ReLU loses its ReLU (up to 896
# output steps wrong). WeightBiasQuantization quantizes the float weight of a conv/gemm whose input is
# dequantized to int8, which re-quantizes the fp8-grid weights the engine stores as float32 (up to 40 steps).
# ClipQuantRewrite (Clip, e.g. ReLU6, feeding a QuantizeLinear) reads the zero point as uint8/int8 only: with a
# float8 one the session fails to build ("Unexpected data type for QuantizeLinear input y_zero_point of 17").
FP8_UNSAFE_REWRITES = ("ReluQuantRewrite", "WeightBiasQuantization", "ClipQuantRewrite")


def has_fp8(model) -> bool:
    """Whether ``model`` holds float8e4m3fn tensors (fp8 weights or zero points: the contract's fp8 layers)."""
    return any(is_fp8(t) for t in constant_tensors(model).values())


_ACTIVATION = QuantSpec(IntType(8, signed=False), symmetric=False, granularity=PerTensor())


def float_output_convs(model) -> list:
    """Conv nodes with dequantized input and weight whose output is not quantized: consumed by something
    other than a QuantizeLinear, directly or through one Relu."""
    g = GraphIndex(model)
    producers, graph_outputs = g.producer, g.graph_outputs

    def quantized(tensor: str) -> bool:
        users = [u for u, _ in g.consumers.get(tensor, [])]
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
        if dequantized and any(is_fp8(g.inits.get(name)) for name in w.input[::2]):
            continue  # an fp8 layer runs emulated in fp32 anyway: a uint8 output would only round it once more
        if dequantized and not quantized(node.output[0]):
            out.append(node)
    return out


def quantize_conv_outputs(model, layers: dict, samples) -> list[str]:
    """Insert a calibrated Q/DQ pair after every conv of :func:`float_output_convs` (in place); return the
    layers whose outputs were calibrated. ``samples``: input batches (float32 arrays)."""
    convs = float_output_convs(model)
    if not convs or not samples:
        return []
    ranges = calibrated_ranges(model, [c.output[0] for c in convs], samples, "ONNX Runtime legalization")
    done = []
    for conv in convs:
        tensor = conv.output[0]
        if tensor not in ranges:
            continue  # NaN or infinite on the samples: left float
        scale, zero_point = choose_qparams(*ranges[tensor], _ACTIVATION)
        prefix = conv.name.rsplit("/", 1)[0]  # keeps the layer's scope, so the report attributes the pair
        insert_qdq(
            model,
            tensor,
            np.array(float(scale), np.float32),
            np.array(int(zero_point), np.uint8),
            f"{tensor}_legalized",
            (f"{prefix}/LegalQ_{tensor}", f"{prefix}/LegalDQ_{tensor}"),
        )
        layer = layer_of_node(conv.name, layers)
        if layer is not None:
            done.append(layer)
    return done
