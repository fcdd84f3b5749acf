"""Backends: a small interface (capabilities ``device``, ``precisions``, ``emulated``; ``is_available``,
``legalize``, ``build``, ``load``; engines ``run``, ``profile``, ``placement``, ``save``) and a registry, one
subpackage per engine. Importing this package imports no runtime: ONNX Runtime, OpenVINO, TensorRT and Triton
are imported when an engine is built or loaded."""

from . import cuda as _cuda  # noqa: F401  (registers the backend)
from . import onnxruntime as _onnxruntime  # noqa: F401
from . import openvino as _openvino  # noqa: F401
from . import tensorrt as _tensorrt  # noqa: F401
from .base import (
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    backends_on,
    get_backend,
    list_backends,
    read_engine_file,
    register_backend,
    registered_backend,
)

__all__ = [
    "Backend",
    "BuildOptions",
    "Engine",
    "EngineError",
    "LayerPlacement",
    "LayerTime",
    "backends_on",
    "get_backend",
    "list_backends",
    "read_engine_file",
    "register_backend",
    "registered_backend",
    "load_engine",
]


def load_engine(path) -> Engine:
    """Load an engine file with the backend named in its manifest."""
    manifest, _ = read_engine_file(path)
    return get_backend(manifest["backend"]).load(path)
