"""Int8 exactness on x86 CPUs without VNNI, shared by the CPU backends (ONNX Runtime, OpenVINO).

Without VNNI (AVX512-VNNI or AVX-VNNI), the u8 x s8 int8 kernels of ONNX Runtime and OpenVINO (oneDNN) multiply
with ``vpmaddubsw``, which adds pairs of products in int16 with saturation: a pair overflows once
``2 * 255 * |w| > 32767``, i.e. for weights with ``|q| > 64``, and the layer's result is silently wrong
(benchmarks/results/ort-exactness-cpu.md, benchmarks/results/openvino-exactness-cpu.md). Weights stored as
uint8 with zero point + 128 (the same grid) avoid that path: ONNX Runtime then runs exact u8 x u8 kernels,
OpenVINO runs the layer in float with the dequantized weights. Each backend decides where the engine is
created, so an engine file built on one CPU class runs right on another.
"""

from __future__ import annotations

import platform
from collections.abc import Collection
from pathlib import Path

from .base import layer_of_node

__all__ = [
    "SAFE_U8S8_WEIGHT",
    "cpu_has_vnni",
    "int8_weight_maxima",
    "max_abs_int8_weight",
    "weights_to_uint8",
    "split_int8_weights",
    "layer_maxima",
    "saturating_layers",
    "saturation_message",
]

# u8 x s8 pairs summed in int16 stay exact when |w| <= 64: 2 * 255 * 64 = 32640 <= 32767.
SAFE_U8S8_WEIGHT = 64


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); non-x86 CPUs count as having it."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell (not Linux): keep int8 weights
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _int8_weights(model):
    """(DequantizeLinear node, its int8 weight initializer) for every weight (rank > 1) of the model."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            if w.data_type == onnx.TensorProto.INT8 and len(w.dims) > 1:
                yield node, w


def int8_weight_maxima(model) -> dict[str, int]:
    """``{DequantizeLinear node name: largest |q|}`` over the int8 weight initializers of a Q/DQ model."""
    import numpy as np
    from onnx import numpy_helper

    return {node.name: int(np.abs(numpy_helper.to_array(w).astype(np.int16)).max()) for node, w in _int8_weights(model)}


def max_abs_int8_weight(model) -> int:
    """Largest |q| over the int8 weight initializers that feed a DequantizeLinear (0 if none)."""
    return max(int8_weight_maxima(model).values(), default=0)


def weights_to_uint8(model, nodes: Collection[str] | None = None) -> int:
    """Rewrite int8 weight initializers feeding a DequantizeLinear (those of the DequantizeLinear nodes named
    in ``nodes``; all when None) as uint8 with zero point + 128, in place. The grid is identical (q + 128 with
    zp + 128 dequantizes to the same values). Returns the number of weights rewritten."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ..export import constant_resolver

    inits = {i.name: i for i in model.graph.initializer}
    const = constant_resolver(model, required=True)
    count = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        if nodes is not None and node.name not in nodes:
            continue
        w = inits[node.input[0]]
        if w.data_type != onnx.TensorProto.INT8 or len(node.input) < 3:
            continue
        q = numpy_helper.to_array(w).astype(np.int16) + 128
        w.CopyFrom(numpy_helper.from_array(q.astype(np.uint8), w.name))
        zp = const(node.input[2]).astype(np.int16) + 128
        zp_name = f"{w.name}_zero_point_u8"
        model.graph.initializer.append(numpy_helper.from_array(zp.astype(np.uint8), zp_name))
        node.input[2] = zp_name
        count += 1
    return count


# The consumers whose weight (input 1) a split can double: the bias (input 2) stays with the first half.
SPLITTABLE_OP_TYPES = frozenset({"Conv", "Gemm", "MatMul"})


def split_int8_weights(model, nodes: Collection[str]) -> set[str]:
    """Split each int8 weight of the DequantizeLinear nodes named in ``nodes``, in place, into two int8
    weights that no u8 x s8 kernel saturates on: ``lo = clip(q, -64, 64)`` and ``hi = q - lo`` (|hi| <= 63),
    on the same scales and zero points, each feeding a copy of the layer (the bias stays with ``lo``), the
    two outputs added: ``conv(x, s * q) = conv(x, s * lo) + conv(x, s * hi)``, exact in int32 with
    float rounding at the sum. Both convolutions stay int8 (about twice the layer's int8 work). Returns
    the DequantizeLinear nodes split; a weight with another consumer (or one not at input 1) is left alone."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    done: set[str] = set()
    inserts: list[tuple[object, list]] = []
    for dq, w in list(_int8_weights(model)):
        users = consumers.get(dq.output[0], [])
        graph_output = any(o.name == dq.output[0] for o in graph.output)
        if dq.name not in nodes or len(dq.input) < 2 or graph_output or not users:
            continue
        if any(u.op_type not in SPLITTABLE_OP_TYPES or list(u.input).index(dq.output[0]) != 1 for u in users):
            continue
        q = numpy_helper.to_array(w).astype(np.int16)
        lo = np.clip(q, -SAFE_U8S8_WEIGHT, SAFE_U8S8_WEIGHT)
        w.CopyFrom(numpy_helper.from_array(lo.astype(np.int8), w.name))
        graph.initializer.append(numpy_helper.from_array((q - lo).astype(np.int8), f"{w.name}_hi"))
        dq_hi = onnx.NodeProto()
        dq_hi.CopyFrom(dq)
        dq_hi.name, dq_hi.input[0], dq_hi.output[0] = f"{dq.name}_hi", f"{w.name}_hi", f"{dq.output[0]}_hi"
        inserts.append((dq, [dq_hi]))
        for user in users:
            out = user.output[0]
            half = onnx.NodeProto()
            half.CopyFrom(user)
            half.name = f"{user.name}_hi"
            half.input[1] = dq_hi.output[0]
            del half.input[2:]
            user.output[0], half.output[0] = f"{out}_lo", f"{out}_hi"
            add = helper.make_node("Add", [f"{out}_lo", f"{out}_hi"], [out], name=f"{user.name}_split_add")
            inserts.append((user, [half, add]))
        done.add(dq.name)
    for anchor, extra in inserts:  # keep the graph topologically sorted: each new node right after its anchor
        at = list(graph.node).index(anchor) + 1
        for k, node in enumerate(extra):
            graph.node.insert(at + k, node)
    return done


def layer_maxima(maxima: dict[str, int], layers) -> dict[str, int]:
    """``{layer: largest |q|}`` from ``{DequantizeLinear node: largest |q|}`` (:func:`int8_weight_maxima`)."""
    out: dict[str, int] = {}
    for node, top in maxima.items():
        layer = layer_of_node(node, layers)
        if layer is not None:
            out[layer] = max(top, out.get(layer, 0))
    return out


def saturating_layers(maxima: dict[str, int], layers) -> dict[str, int]:
    """``{layer: largest |q|}`` for the layers whose int8 weights exceed :data:`SAFE_U8S8_WEIGHT`."""
    return {k: v for k, v in layer_maxima(maxima, layers).items() if v > SAFE_U8S8_WEIGHT}


def saturation_message(backend: str, layers: dict[str, int]) -> str:
    """One line for an engine that keeps int8 weights with ``|q| > 64`` on a CPU without VNNI:
    ``layers`` is ``{layer: largest |q|}``."""
    named = ", ".join(f"{k} (|q| up to {v})" for k, v in sorted(layers.items()))
    return (
        f"{backend} engine is not exact on this CPU: it has no VNNI, so the u8 x s8 int8 kernels add pairs of "
        f"products in int16 with saturation, which is wrong for weights with |q| > {SAFE_U8S8_WEIGHT}: {named}. "
        "Fix: quantize these layers' weights to 7 bits (quant_bits {'input': 8, 'weight': 7}), or build with "
        "uint8_weights=None (the default: exact)"
    )
