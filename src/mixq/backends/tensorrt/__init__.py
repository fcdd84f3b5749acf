"""TensorRT backend (strongly typed networks, 10.12+/11): :mod:`.engine` (build, run, profile, save/load),
:mod:`.legalize` (the Q/DQ graph rewritten for TensorRT), :mod:`.check` (TensorRT's rules checked with onnx
alone) and :mod:`.inspect` (the engine inspector's and profiler's output read back). Importing it imports no
tensorrt."""

from .engine import TensorRTBackend, TensorRTEngine

__all__ = ["TensorRTBackend", "TensorRTEngine"]
