"""Float patterns of transformer exports rewritten as one node each before the ``cuda`` lowering, so each runs as
one torch call instead of a chain of elementwise kernels over the same tensor (the engine's float ops are the
transformer's time outside the int8/fp8 GEMMs):

- GELU through Erf (torch's exact GELU at opsets < 20): ``Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)`` ->
  ``Gelu(x)`` (the ONNX opset 20 op);
- attention: ``MatMul(Softmax(MatMul(Mul(q, c), kT)), v)`` (``Div(q, 1/c)`` too, or no scale) ->
  ``mixq.ScaledDotProductAttention(q, kT, v, scale=c)``, run as torch's ``scaled_dot_product_attention`` of
  ``kT``'s transpose (a view): the scores never reach device memory.

Each intermediate must have one reader and not be a graph output; anything else is left as it is. Same functions,
different rounding order (both in float32 here)."""

from __future__ import annotations

import math

import numpy as np

from ..onnx_graph import GraphIndex, attributes

__all__ = ["ATTENTION_OP", "fuse_float_patterns"]

ATTENTION_OP = "ScaledDotProductAttention"  # domain "mixq": read only by this backend's lowering


def fuse_float_patterns(model):
    """A copy of ``model`` with the patterns of the module doc fused (``model`` is not changed)."""
    import onnx

    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    for rewrite in (_fuse_gelu, _fuse_attention):
        index = GraphIndex(fused)
        for node in index.nodes:
            rewrite(fused, index, node)
    return fused


def _only_reader(index: GraphIndex, name: str, op_type: str):
    """The one node reading ``name`` if it is an ``op_type`` and ``name`` is no graph output, else None."""
    readers = index.consumers.get(name, [])
    if len(readers) != 1 or name in index.graph_outputs or readers[0][0].op_type != op_type:
        return None
    return readers[0][0]


def _scalar(index: GraphIndex, name: str) -> float | None:
    if not index.is_constant(name):
        return None
    v = np.asarray(index.value(name))
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _other(node, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (None if ``name`` is not one of them)."""
    if list(node.input).count(name) != 1 or len(node.input) != 2:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _fuse_gelu(model, index: GraphIndex, erf) -> None:
    from onnx import helper

    if erf.op_type != "Erf":
        return
    div = index.producer.get(erf.input[0])
    if div is None or div.op_type not in ("Div", "Mul") or index.is_constant(div.input[0]):
        return
    x, c = div.input[0], _scalar(index, div.input[1])
    if c is None or not math.isclose(c if div.op_type == "Div" else 1.0 / c, math.sqrt(2.0), rel_tol=1e-5):
        return
    if _only_reader(index, div.output[0], "Erf") is None:
        return
    add = _only_reader(index, erf.output[0], "Add")
    if add is None or _scalar(index, _other(add, erf.output[0]) or "") != 1.0:
        return
    mul = _only_reader(index, add.output[0], "Mul")
    if mul is None or _other(mul, add.output[0]) != x:
        return
    half = _only_reader(index, mul.output[0], "Mul")
    if half is None or _scalar(index, _other(half, mul.output[0]) or "") != 0.5:
        return
    gelu = helper.make_node("Gelu", [x], [half.output[0]], name=erf.name.replace("Erf", "Gelu"))
    _splice(model, [div, erf, add, mul, half], [gelu])


def _fuse_attention(model, index: GraphIndex, softmax) -> None:
    from onnx import helper

    if softmax.op_type != "Softmax" or attributes(softmax).get("axis", -1) not in (-1, 3):
        return
    scores = index.producer.get(softmax.input[0])
    if scores is None or scores.op_type != "MatMul" or _only_reader(index, scores.output[0], "Softmax") is None:
        return
    out = _only_reader(index, softmax.output[0], "MatMul")
    if out is None or out.input[0] != softmax.output[0]:
        return
    q, kt, v = scores.input[0], scores.input[1], out.input[1]
    if any(index.is_constant(t) for t in (q, kt, v)):
        return
    drop, scale = [scores, softmax, out], 1.0
    mul = index.producer.get(q)
    if mul is not None and mul.op_type in ("Mul", "Div") and _only_reader(index, q, "MatMul") is not None:
        c = _scalar(index, mul.input[1])
        if c is not None and not index.is_constant(mul.input[0]):
            q, scale = mul.input[0], (c if mul.op_type == "Mul" else 1.0 / c)
            drop.append(mul)
    name = out.name.rsplit("/", 1)[0] + "/" + ATTENTION_OP
    sdpa = helper.make_node(ATTENTION_OP, [q, kt, v], [out.output[0]], name=name, domain="mixq", scale=scale)
    _splice(model, drop, [sdpa])


def _splice(model, old: list, new: list) -> None:
    """Replace the nodes ``old`` by ``new``, placed where the last of ``old`` was (every input of ``new`` is
    computed before that, as the last of ``old`` read them or their sources). Nodes are told apart by their
    outputs (unique in a graph; protobuf hands out new wrapper objects after an edit)."""
    nodes = list(model.graph.node)
    gone = {tuple(n.output) for n in old}
    at = max(i for i, n in enumerate(nodes) if tuple(n.output) in gone)
    keep = [n for n in nodes[:at] if tuple(n.output) not in gone] + new + nodes[at + 1 :]
    del model.graph.node[:]
    model.graph.node.extend(keep)
