"""Reading what TensorRT built: the engine inspector's JSON and the per-layer times of an ``IProfiler``, turned
into mixq's placement rows and layer times. Pure Python, so it is tested on CPU against recorded samples
(``tests/data/tensorrt/``).

The JSON (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` with
``ProfilingVerbosity.DETAILED``) has ``{"Layers": [...]}``, one object per engine layer with ``Name``,
``LayerType``, ``Inputs``/``Outputs`` (tensors with ``Name``, ``Dimensions`` and their type), ``TacticName`` and
``Metadata``. Versions differ in two places, both read here:

* the tensor type: TensorRT 10 writes one free-text ``"Format/Datatype"`` ("Row major linear FP32",
  "Thirty-two wide channel vectorized row major Int8 format", ...); TensorRT 11 splits it into ``"Format"``
  and a data-type field (TensorRT 11 migration guide, "Migrating IEngineInspector Usage from TensorRT 10.x
  to 11.x"). Data types are read case-insensitively from either (FP32/Float, FP16/Half, Int8, FP8, BF16).
* the I/O list: TensorRT 10's ``"Bindings"`` (names) became ``"I/O Tensors"`` (objects) in 11.

Engine layers are tied to ONNX nodes through ``Metadata``: the ONNX parser records ``[ONNX Layer: <node>]``
for every ONNX node folded into the layer (``ILayer::setMetadata``, "emitted in the JSON returned by
IEngineInspector with ProfilingVerbosity set to kDETAILED", ``NvInfer.h``), separated by control characters.
Without metadata the layer name is split on TensorRT's fusion separator ``" + "``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass

from ..base import FUSED_INTO_NEIGHBOUR, LayerPlacement, LayerTime, layer_of_node
from ..profiling import LayerSamples
from .legalize import NOTES_KEY

__all__ = ["EngineLayer", "parse_engine_information", "io_tensors", "tensor_dtype", "placement", "layer_times"]

_DTYPES = {
    "fp32": "fp32",
    "float": "fp32",
    "float32": "fp32",
    "fp16": "fp16",
    "half": "fp16",
    "float16": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "int8": "int8",
    "fp8": "fp8",
    "float8": "fp8",
    "int4": "int4",
    "fp4": "fp4",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "bool": "bool",
}
# The precision a layer computes in, from its input types: the narrowest quantized type wins.
_RANK = ("fp4", "int4", "fp8", "int8", "fp16", "bf16", "fp32")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]\x1e\x1f]+)\]")
_COMPUTE_FIRST = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_GLUE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "Identity", "Constant", "Reshape", "Flatten"})


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, as the inspector describes it."""

    name: str
    layer_type: str
    onnx_nodes: tuple[str, ...]
    input_dtypes: tuple[str | None, ...]
    output_dtypes: tuple[str | None, ...]
    tactic: str = ""

    @property
    def computes_in(self) -> str | None:
        """What it computes in: the narrowest type among its inputs (outputs if it has none)."""
        types = [t for t in (self.input_dtypes or self.output_dtypes) if t in _RANK]
        return min(types, key=_RANK.index) if types else None


def tensor_dtype(tensor) -> str | None:
    """``fp32`` | ``fp16`` | ``bf16`` | ``int8`` | ``fp8`` | ... of an inspector tensor object, or None."""
    if not isinstance(tensor, dict):
        return None
    fields = {k.lower(): v for k, v in tensor.items() if isinstance(v, str)}
    if "datatype" in fields:  # TensorRT 11: its own field
        return _DTYPES.get(fields["datatype"].strip().lower().removeprefix("k"), fields["datatype"].lower())
    text = fields.get("format/datatype", "")
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _DTYPES:
            return _DTYPES[word]
    return None


def _onnx_nodes(layer: dict) -> tuple[str, ...]:
    metadata = layer.get("Metadata")
    if isinstance(metadata, list):
        metadata = "".join(str(m) for m in metadata)
    found = _ONNX_LAYER.findall(str(metadata or ""))
    if found:
        return tuple(n.strip() for n in found)
    name = str(layer.get("Name", ""))
    if name.startswith("Reformatting ") or layer.get("LayerType") == "Reformat":
        return ()  # a layout copy TensorRT inserted ("Reformatting CopyNode for Input Tensor 0 to <layer>")
    return tuple(p.strip() for p in name.split(" + ") if p.strip())


def parse_engine_information(info) -> list[EngineLayer]:
    """The layers of an inspector JSON (a string or the parsed object). Layer entries that are bare names
    (``ProfilingVerbosity.LAYER_NAMES_ONLY``) give layers without types."""
    data = json.loads(info) if isinstance(info, str | bytes) else info
    out = []
    for layer in data.get("Layers", []) if isinstance(data, dict) else []:
        if isinstance(layer, str):
            out.append(EngineLayer(layer, "", _onnx_nodes({"Name": layer}), (), ()))
            continue
        if not isinstance(layer, dict):
            continue
        out.append(
            EngineLayer(
                str(layer.get("Name", "")),
                str(layer.get("LayerType", "")),
                _onnx_nodes(layer),
                tuple(tensor_dtype(t) for t in layer.get("Inputs", []) or []),
                tuple(tensor_dtype(t) for t in layer.get("Outputs", []) or []),
                str(layer.get("TacticName", "")),
            )
        )
    return out


def io_tensors(info) -> list[dict]:
    """``[{"name", "mode", "dtype"}]`` of the engine's I/O: TensorRT 11's ``"I/O Tensors"`` objects, or
    TensorRT 10's ``"Bindings"`` names (mode and dtype then None)."""
    data = json.loads(info) if isinstance(info, str | bytes) else info
    if "I/O Tensors" in data:
        return [
            {"name": t.get("Name"), "mode": t.get("IOMode"), "dtype": tensor_dtype({"DataType": t.get("DataType", "")})}
            for t in data["I/O Tensors"]
        ]
    return [{"name": n, "mode": None, "dtype": None} for n in data.get("Bindings", [])]


def _op(node: str, ops: dict[str, str]) -> str:
    """The op type of an ONNX node: from the graph, else from the exporter's name (``/fc1/Gemm`` -> Gemm)."""
    return ops.get(node) or node.rsplit("/", 1)[-1].split("_")[0]


def _leader(layer: EngineLayer, ops: dict[str, str], layers: dict) -> str | None:
    """The mixq layer whose kernel this engine layer is: the layer of its first conv/gemm node, else of its
    first node that is not glue (Q/DQ, casts, reshapes), else None (glue)."""
    nodes = [n for n in layer.onnx_nodes if layer_of_node(n, layers) is not None]
    hit = next((n for n in nodes if _op(n, ops) in _COMPUTE_FIRST), None)
    hit = hit or next((n for n in nodes if _op(n, ops) not in _GLUE_OPS), None)
    return layer_of_node(hit, layers) if hit is not None else None


def placement(engine_layers: list[EngineLayer], ops: dict[str, str], layers: dict) -> list[LayerPlacement]:
    """One row per mixq layer: the kernels whose leader it is and their precision, ``fused`` when its
    nodes only appear inside another layer's kernel, and the standalone Q/DQ kernels in it.
    ``ops``: ``{onnx node name: op_type}`` of the graph TensorRT parsed ({} if unknown)."""
    kernels: dict[str, list[str]] = defaultdict(list)
    precisions: dict[str, set] = defaultdict(set)
    qdq: dict[str, int] = defaultdict(int)
    for layer in engine_layers:
        leader = _leader(layer, ops, layers)
        if leader is not None:
            kernels[leader].append(layer.layer_type or layer.name)
            if layer.computes_in:
                precisions[leader].add(layer.computes_in)
            continue
        for node in layer.onnx_nodes:  # a standalone glue kernel: count its Q/DQ in their layer
            owner = layer_of_node(node, layers)
            if owner is not None and _op(node, ops) in ("QuantizeLinear", "DequantizeLinear"):
                qdq[owner] += 1
    rows = []
    for name, info in layers.items():
        found = precisions.get(name, set())
        runs_as = min(found, key=_RANK.index) if found else "fused"
        runs_as = {"bf16": "fp16"}.get(runs_as, runs_as)
        notes = list(info.get(NOTES_KEY, []))
        if runs_as == "fused" and not kernels.get(name):
            notes.insert(0, f"{FUSED_INTO_NEIGHBOUR}'s kernel")
        rows.append(
            LayerPlacement(
                name,
                info["op_type"],
                info["precision"],
                runs_as,
                tuple(kernels.get(name, ())),
                qdq[name],
                "; ".join(notes),
            )
        )
    return rows


def layer_times(
    runs: list[dict[str, float]], engine_layers: list[EngineLayer], ops: dict[str, str], layers: dict
) -> list[LayerTime]:
    """Per mixq layer, the median over ``runs`` (one ``{engine layer name: ms}`` per inference, as an
    ``IProfiler`` reports them) of the time of the kernels it leads; every other kernel (standalone Q/DQ,
    reformats, casts, unknown names) is ``(glue)``. Microseconds, slowest first."""
    owner = {layer.name: _leader(layer, ops, layers) or "(glue)" for layer in engine_layers}
    kinds = {layer.name: layer.layer_type or layer.name for layer in engine_layers}
    samples = LayerSamples(len(runs))
    for i, run in enumerate(runs):
        for name, ms in run.items():
            samples.add(owner.get(name, "(glue)"), i, float(ms) * 1000.0, kinds.get(name, name))
    return samples.layer_times()
