"""NNI's speedup names: ``ModelSpeedup`` with NNI's defaults (any backend, ``auto`` by default),
``ModelSpeedupTensorRT`` (the TensorRT backend) and ``CalibrateType``."""

from __future__ import annotations

from ..backends import EngineError, get_backend
from ..speedup import ModelSpeedup as _ModelSpeedup

__all__ = ["ModelSpeedup", "ModelSpeedupTensorRT", "CalibrateType", "DEFAULT_ONNX_PATH", "DEFAULT_CALIBRATION_CACHE"]

DEFAULT_ONNX_PATH = "default_model.onnx"  # NNI writes the ONNX model it builds from here by default
DEFAULT_CALIBRATION_CACHE = "calibration.cache"  # and, when calibrating, this cache


class CalibrateType:
    """NNI's calibrator names, mapped onto mixq observers (TensorRT 10 deprecates implicit calibrators, so
    calibration happens in mixq and the engine gets explicit Q/DQ)."""

    LEGACY = "minmax"
    ENTROPY = "entropy"
    ENTROPY2 = "entropy"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class ModelSpeedup(_ModelSpeedup):
    """NNI's ``ModelSpeedupTensorRT`` signature and defaults on any backend (``backend="auto"`` by default):
    the Q/DQ ONNX model is written to ``onnx_path="default_model.onnx"``, calibration from
    ``calib_data_loader`` uses ``CalibrateType.ENTROPY2`` and is kept in ``calibration_cache="calibration.cache"``
    (both in the working directory, as NNI does; pass None to write neither). Everything else is
    :class:`mixq.speedup.ModelSpeedup`, whose defaults write no files."""

    def __init__(
        self,
        model,
        input_shape,
        config=None,
        onnx_path=DEFAULT_ONNX_PATH,
        extra_layer_bits=32,
        strict_datatype=True,
        calibrate_type=CalibrateType.ENTROPY2,
        calib_data_loader=None,
        calibration_cache=DEFAULT_CALIBRATION_CACHE,
        batchsize=1,
        input_names=("actual_input_1",),
        output_names=("output1",),
        **kwargs,
    ):
        super().__init__(
            model,
            input_shape,
            config,
            onnx_path=onnx_path,
            extra_layer_bits=extra_layer_bits,
            strict_datatype=strict_datatype,
            calibrate_type=calibrate_type,
            calib_data_loader=calib_data_loader,
            calibration_cache=calibration_cache,
            batchsize=batchsize,
            input_names=input_names,
            output_names=output_names,
            **kwargs,
        )


class ModelSpeedupTensorRT(ModelSpeedup):
    """NNI's ``ModelSpeedupTensorRT``: :class:`ModelSpeedup` on the TensorRT backend. Without TensorRT it
    raises a clear error pointing to ``backend="auto"``."""

    def __init__(self, model, input_shape, config=None, **kwargs):
        backend = kwargs.pop("backend", "tensorrt")
        if backend == "tensorrt":
            try:
                get_backend("tensorrt")
            except EngineError as e:
                raise EngineError(
                    "ModelSpeedupTensorRT needs TensorRT 10.12 to 11.x and a CUDA GPU, which this machine lacks; pass "
                    "backend='auto' to build the fastest engine this machine has (ONNX Runtime, OpenVINO), or use "
                    "mixq.nni.ModelSpeedup(model, input_shape, config=...), which does so by default"
                ) from e
        super().__init__(model, input_shape, config, backend=backend, **kwargs)
