"""The backend interface and registry, and the engine container format shared by all backends.

An engine file is a zip archive holding ``manifest.json`` (format version, backend, input spec, layers,
sha256 of every member) and the backend's members (e.g. the Q/DQ ONNX model and ORT's optimized graph,
or a TensorRT plan). Loading checks the format version, the backend and every checksum before use, so a
truncated, bit-flipped or foreign file gives a clear error and nothing is unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, unwritable_reason
from .errors import EngineError
from .onnx_graph import (  # re-exported: the graph helpers lived here before backends/onnx_graph.py
    constant_tensors,
    constant_values,
    dequantize_constant,
    fold_fp8_weights,
    fp8_array,
    fp8_dtype,
    is_fp8,
    tensor_ranges,
)

__all__ = [
    "EngineError",
    "BuildOptions",
    "LayerPlacement",
    "LayerTime",
    "Legalized",
    "Engine",
    "Backend",
    "register_backend",
    "get_backend",
    "list_backends",
    "registered_backend",
    "backends_on",
    "PRECISIONS",
    "ENGINE_FORMAT_VERSION",
    "GLUE_PRECISIONS",
    "layer_of_node",
    "copy_layers",
    "fp8_emulated_note",
    "FUSED_INTO_NEIGHBOUR",
    "FLOAT_BIAS_NOTE",
    "tensor_ranges",
    "fold_fp8_weights",
    "fp8_dtype",
    "is_fp8",
    "fp8_array",
    "constant_tensors",
    "constant_values",
    "dequantize_constant",
    "FP8_CAPABILITY",
    "check_fp8_support",
]

ENGINE_FORMAT_VERSION = 1


GLUE_PRECISIONS = ("fp32", "fp16")  # BuildOptions.float_glue values


@dataclass(frozen=True)
class BuildOptions:
    """How to build. ``max_batch``/``opt_batch``: TensorRT's optimization profile for the dynamic batch.
    ``threads``: intra-op threads (ONNX Runtime; None = all cores). ``keep_pools_float``: stop ONNX Runtime's
    QDQ propagation from moving a QuantizeLinear above pooling/reshape nodes (uint8 pooling is slower than
    float on CPU; see docs/engines.md). ``uint8_weights``: store int8 weights as uint8 (zero point + 128, the
    same grid) for ONNX Runtime; None decides from the CPU. ``calibration_data``: sample input batches
    (float32 arrays) a backend may run at build time to calibrate tensors its legalization must quantize
    (ONNX Runtime: conv outputs feeding residual adds); not stored in engine files. ``float_glue``
    (``cuda`` backend): the precision of the float ops that no layer covers (LayerNorm, GELU, attention, residual
    adds, layout changes) and of the int8/fp8 kernels' float outputs: ``"fp32"`` computes them as the fake-quant
    model does, ``"fp16"`` halves their memory traffic and runs attention as fp16 flash attention (fp16 rounding;
    docs/transformers.md measures both)."""

    max_batch: int = 256
    opt_batch: int = 128
    threads: int | None = None
    keep_pools_float: bool = True
    workspace_bytes: int = 1 << 30
    uint8_weights: bool | None = None  # None = decide from the CPU (see cpu_features)
    strict_precision: bool = True  # NNI's strict_datatype; TensorRT 10.12+/11 builds strongly typed: always obeyed
    float_glue: str = "fp32"  # cuda backend: "fp32" | "fp16"
    calibration_data: tuple = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class LayerPlacement:
    """What one layer asked for and what it actually runs as on the backend."""

    layer: str
    op_type: str
    requested: str  # int8 | fp16 | fp32
    runs_as: str  # int8 | fp16 | fp32 | fused
    kernels: tuple[str, ...]
    unfused_qdq: int
    note: str = ""

    @property
    def mismatch(self) -> bool:
        return self.requested == "int8" and self.runs_as not in ("int8", "fused")


@dataclass(frozen=True)
class Legalized:
    """A Q/DQ model rewritten for one backend and its layers metadata (with notes of what changed)."""

    model: object  # onnx.ModelProto
    layers: dict


@dataclass(frozen=True)
class LayerTime:
    layer: str
    microseconds: float
    kernels: tuple[str, ...] = field(default_factory=tuple)


class Engine(ABC):
    """A built engine: ``run`` validates its input and returns a CPU float32 tensor. ``inexact``: why its
    results differ from the fake-quant model beyond rounding, where the backend knows it will (e.g. int8
    kernels that saturate on this CPU); empty otherwise. ``backend="auto"`` never keeps such an engine."""

    backend: str
    inexact: str = ""

    def __init__(self, input_shape: tuple[int, ...], layers: dict, max_batch: int | None = None):
        self.input_shape = tuple(int(d) for d in input_shape)
        self.layers = layers
        self.max_batch = max_batch

    def check_input(self, x, check_finite: bool = True) -> torch.Tensor:
        """The contract of ``run``: a float32 tensor (or ndarray) shaped ``[batch, *input_shape[1:]]``,
        1 <= batch (<= max_batch where the backend has one). Tensors on another device are copied to the
        engine's device; non-contiguous ones are made contiguous. NaN or infinite values are an error
        (quantized kernels would silently turn them into saturated values)."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise EngineError(f"input must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.dtype != torch.float32:
            hint = (
                " (convert and normalize images the way the model was trained first)"
                if not x.is_floating_point()
                else ""
            )
            raise EngineError(f"input dtype must be float32, got {x.dtype}{hint}")
        expected = ("batch", *self.input_shape[1:])
        if x.dim() != len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise EngineError(f"input shape must be {expected}, got {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise EngineError("input batch is empty")
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise EngineError(
                f"batch {x.shape[0]} exceeds this engine's max batch {self.max_batch}; rebuild with a larger max_batch"
            )
        x = x.contiguous()
        if check_finite:
            # numpy on CPU: a torch op here would wake torch's OpenMP pool, whose spinning threads then
            # compete with the engine's own threads (measured: ONNX Runtime LeNet 0.9 ms -> 5.8 ms on 2 cores).
            finite = bool(torch.isfinite(x).all()) if x.device.type != "cpu" else bool(np.isfinite(x.numpy()).all())
            if not finite:
                raise EngineError("input contains NaN or infinite values")
        return x

    @abstractmethod
    def run(self, x, check_finite: bool = True) -> torch.Tensor: ...

    @abstractmethod
    def placement(self) -> list[LayerPlacement]: ...

    @abstractmethod
    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]: ...

    def unattributed_qdq(self) -> int | None:
        """How many Q/DQ nodes of the built graph lie outside every layer (the placement report's glue), where
        the backend can tell; None where it cannot."""
        return None

    @abstractmethod
    def members(self) -> dict[str, bytes]:
        """The files that make up this engine, for :meth:`save`."""

    def save(self, path: str | os.PathLike) -> Path:
        members = self.members()
        manifest = {
            "format": "mixq-engine",
            "format_version": ENGINE_FORMAT_VERSION,
            "backend": self.backend,
            "input_shape": list(self.input_shape),
            "max_batch": self.max_batch,
            "layers": self.layers,
            "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in members.items()},
        }
        try:
            with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("manifest.json", json.dumps(manifest, indent=1))
                for name, data in members.items():
                    z.writestr(name, data)
        except OSError as e:
            # unwritable_reason explains the common cases better than errno does (a parent that is a file
            # reads "File exists"); a full disk or a failed rename has no such cause, so errno says it then.
            reason = unwritable_reason(path, folder=False) or (e.strerror or str(e))
            raise EngineError(f"{path}: cannot write the engine file ({reason})") from e
        return Path(path)


def read_engine_file(path: str | os.PathLike, backend: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """(manifest, members) of an engine file, verified; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: engine file not found")
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("manifest.json"))
            members = {n: z.read(n) for n in z.namelist() if n != "manifest.json"}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
        raise EngineError(f"{path}: not a mixq engine file or truncated ({type(e).__name__}: {e})") from e
    except zipfile.LargeZipFile as e:
        raise EngineError(f"{path}: not a mixq engine file ({e})") from e
    except Exception as e:  # zlib.error and CRC failures from a bit-flipped archive
        raise EngineError(f"{path}: engine file is corrupted ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "mixq-engine":
        raise EngineError(f"{path}: not a mixq engine file (no mixq manifest)")
    version = manifest.get("format_version")
    if version != ENGINE_FORMAT_VERSION:
        raise EngineError(f"{path}: engine format version {version!r}; this mixq reads version {ENGINE_FORMAT_VERSION}")
    if backend is not None and manifest.get("backend") != backend:
        raise EngineError(f"{path}: engine was built for backend {manifest.get('backend')!r}, not {backend!r}")
    for name, digest in manifest.get("sha256", {}).items():
        if name not in members or hashlib.sha256(members[name]).hexdigest() != digest:
            raise EngineError(f"{path}: member {name!r} is missing or corrupted (checksum mismatch)")
    return manifest, members


FUSED_INTO_NEIGHBOUR = "no kernel of its own: fused into a neighbour"  # placement notes start so
# The export leaves a layer's bias float when it does not fit int32 steps (``layers[...]["float_bias"]``).
FLOAT_BIAS_NOTE = "asked int8, runs float: its bias does not fit int32 steps (an output channel with all-zero weights)"


def fp8_emulated_note(runtime: str, how: str) -> str:
    """The placement note of an fp8 layer on a backend without fp8 kernels (``runtime``: its name in the
    report, ``how``: how the rounding is emulated there)."""
    return f"asked fp8: {runtime} CPU has no fp8 kernels; fp8 rounding emulated in fp32 {how}"


def copy_layers(layers: dict) -> dict:
    """A deep copy of a layers metadata mapping (what legalizations change instead of the export's)."""
    return copy.deepcopy(layers)


def layer_of_node(node_name: str, layers) -> str | None:
    """Map an ONNX node name with the exporter's scope (``/layer1/layer1.0/conv1/Conv_token_3``) to the
    deepest configured layer name it lies in. Scope parts are either attribute names or full dotted names."""
    node_name = node_name.removeprefix("fused ")  # ORT's Conv/Gemm+activation fusion
    parts = [p for p in node_name.split("/") if p][:-1]
    dotted, last, best = "", "", None
    for p in parts:
        if not dotted or p.startswith(dotted + "."):  # full dotted name
            dotted = p
        elif last and p.startswith(last + "."):  # container child written as "<container>.<index>"
            dotted += p[len(last) :]
        else:  # attribute name
            dotted = f"{dotted}.{p}"
        last = p
        if dotted in layers:
            best = dotted
    return best


FP8_CAPABILITY = (8, 9)  # e4m3 tensor cores: Ada (8.9) and Hopper (9.0) onwards


def check_fp8_support(what: str | None, device, capability: tuple[int, int] | None = None) -> None:
    """fp8 needs e4m3 tensor cores: one line naming ``what`` runs fp8 (e.g. ``"node '/stem/Conv'"``; None:
    nothing does) and the GPU's compute capability (``capability``; None: that of ``device``) when it is below
    :data:`FP8_CAPABILITY`. Nothing to check off CUDA devices. Call it before any compiling or building."""
    if what is None or torch.device(device).type != "cuda":
        return
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        raise EngineError(
            f"{what} runs fp8 (e4m3), which needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"this one is {cap[0]}.{cap[1]}: export those layers as int8 or fp16 instead"
        )


PRECISIONS = frozenset({"fp32", "fp16", "int8", "fp8"})  # what a layer can ask for (``layers[...]["precision"]``)


class Backend(ABC):
    """A backend and what it can run, read without building anything (``auto``, the search and ``speedup``
    ask these instead of naming backends). ``device``: where its engines run, ``"cpu"`` or ``"cuda"``.
    ``precisions``: the layer precisions it has kernels of their own for. ``emulated``: precisions it builds
    exactly but runs as fp32 kernels with the rounding emulated around them, slower than fp32 (what a search
    should not offer there). Any other precision a layer asks for runs as fp32 at fp32's cost (the placement
    report says so)."""

    name: str
    package: str  # the Python package the backend runs on, imported only when an engine is built or loaded
    device: str  # "cpu" | "cuda"
    precisions: frozenset[str]
    emulated: frozenset[str] = frozenset()

    def is_available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec(self.package) is not None

    def unavailable_reason(self) -> str:
        return f"backend {self.name!r} needs the {self.package} package (pip install {self.package})"

    def legalize(self, model, layers: dict, options: BuildOptions) -> Legalized:
        """The backend-neutral Q/DQ ``model`` (``layers``: its layers metadata) rewritten into what this backend
        runs as asked, decided from the graph alone (and ``options.calibration_data``); ``model`` and ``layers``
        are not changed. What depends on the machine an engine runs on (e.g. the CPU backends' weight layout)
        is decided where the engine is created, so an engine file stays portable. Default: nothing to rewrite."""
        return Legalized(model, layers)

    def build(self, qdq, input_shape: tuple[int, ...], options: BuildOptions) -> Engine:
        """Build from a :class:`mixq.export.QDQExport`: :meth:`legalize`, then :meth:`build_legal`."""
        return self.build_legal(self.legalize(qdq.model, qdq.layers, options), tuple(input_shape), options)

    def build_legal(self, legal: Legalized, input_shape: tuple[int, ...], options: BuildOptions) -> Engine:
        """The engine of a legalized graph (what :meth:`build` calls after :meth:`legalize`)."""
        raise NotImplementedError(f"backend {self.name!r} builds in build()")

    def load(self, path: str | os.PathLike) -> Engine:
        """The engine saved at ``path``: the file checked (:func:`read_engine_file`: format, backend, checksums),
        then :meth:`engine_from_file`; a manifest or member that is missing or malformed is one
        :class:`EngineError` naming the file."""
        manifest, members = read_engine_file(path, self.name)
        try:
            input_shape = tuple(int(d) for d in manifest["input_shape"])
            layers = manifest["layers"]
            if not isinstance(layers, dict):
                raise TypeError(f"layers is a {type(layers).__name__}, not a mapping")
            return self.engine_from_file(manifest, members, input_shape, layers)
        except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise EngineError(f"{path}: engine manifest or members are incomplete ({type(e).__name__}: {e})") from e

    def engine_from_file(self, manifest: dict, members: dict[str, bytes], input_shape: tuple[int, ...], layers: dict):
        """The engine of a checked engine file (:meth:`load`); ``KeyError``/``TypeError``/``ValueError`` for
        missing or malformed members become :meth:`load`'s one error."""
        raise NotImplementedError(f"backend {self.name!r} loads in load()")


_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _REGISTRY[name] = factory


def list_backends() -> list[str]:
    return sorted(_REGISTRY)


def registered_backend(name: str) -> Backend | None:
    """The backend called ``name`` whether or not it is usable here (to read its capabilities: ``device``,
    ``precisions``, ``emulated``); None when no backend of that name is registered."""
    factory = _REGISTRY.get(name)
    return factory() if factory is not None else None


def backends_on(device: str) -> list[str]:
    """Registered backends whose engines run on ``device`` (``"cpu"`` or ``"cuda"``), by name."""
    return [name for name in list_backends() if _REGISTRY[name]().device == device]


def get_backend(name: str) -> Backend:
    """The backend called ``name``, if usable here. ``auto`` is not one backend: it chooses among them by
    measurement (``ModelSpeedup(backend="auto")``, :mod:`mixq.auto`)."""
    if name == "auto":
        raise EngineError(
            "'auto' is not a single backend: ModelSpeedup(backend='auto') builds the usable ones and keeps the "
            f"fastest; get_backend takes one of {list_backends()}"
        )
    if name not in _REGISTRY:
        raise EngineError(f"unknown backend {name!r}; available: {['auto', *list_backends()]}")
    backend = _REGISTRY[name]()
    if not backend.is_available():
        raise EngineError(backend.unavailable_reason())
    return backend
