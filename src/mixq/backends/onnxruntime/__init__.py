"""ONNX Runtime (CPU) backend: :mod:`.engine` (session, placement, profile, save/load) and :mod:`.legalize`
(build-time calibration of the conv outputs ORT needs quantized). Importing it imports no onnxruntime."""

from .engine import INT8_KERNELS, OnnxRuntimeBackend, OnnxRuntimeEngine

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeEngine", "INT8_KERNELS"]
