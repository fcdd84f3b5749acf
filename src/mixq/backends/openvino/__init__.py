"""OpenVINO (CPU) backend: :mod:`.engine`. Importing it imports no openvino."""

from .engine import OpenVINOBackend, OpenVINOEngine, fp8_initializers_as_raw, fp8_message

__all__ = ["OpenVINOBackend", "OpenVINOEngine", "fp8_initializers_as_raw", "fp8_message"]
