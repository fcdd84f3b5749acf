"""NNI's speedup names: ``ModelSpeedupTensorRT`` (the TensorRT backend) and ``CalibrateType``."""

from __future__ import annotations

from ..backends import EngineError, get_backend
from ..speedup import ModelSpeedup

__all__ = ["ModelSpeedupTensorRT", "CalibrateType"]


class CalibrateType:
    """NNI's calibrator names, mapped onto mixq observers (TensorRT 10 deprecates implicit calibrators, so
    calibration happens in mixq and the engine gets explicit Q/DQ)."""

    LEGACY = "minmax"
    ENTROPY = "entropy"
    ENTROPY2 = "entropy"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class ModelSpeedupTensorRT(ModelSpeedup):
    """NNI's ``ModelSpeedupTensorRT``: :class:`ModelSpeedup` on the TensorRT backend. Without TensorRT it
    raises a clear error pointing to ``ModelSpeedup(..., backend="onnxruntime")``."""

    def __init__(self, model, input_shape, config=None, **kwargs):
        backend = kwargs.pop("backend", "tensorrt")
        if backend == "tensorrt":
            try:
                get_backend("tensorrt")
            except EngineError as e:
                raise EngineError(
                    "ModelSpeedupTensorRT needs TensorRT 10+ and a CUDA GPU, which this machine lacks; use "
                    "mixq.nni.ModelSpeedup(model, input_shape, config=..., backend='onnxruntime') for the CPU engine"
                ) from e
        super().__init__(model, input_shape, config, backend=backend, **kwargs)
