"""mixq: mixed-precision quantization that really runs faster.

Importing mixq loads torch only: no CUDA initialisation, no ONNX Runtime or TensorRT import.

Layers, bottom up: ``spec``/``primitives`` (pure math) <- ``observers`` <- ``config`` <- ``quantization``
(fake-quant modules, layer wrappers, the model verbs) -> ``calibration`` (file format) <- ``export`` (float
model + calibration -> Q/DQ ONNX) <- ``backends`` <- ``speedup`` <- ``report``, ``api`` (the native verbs
``quantize``, ``compile``, ``load``); faces: ``nni``, ``cli``.
Demo and benchmark support (models, data sets, download, demo, tutorial assets, metrics): ``mixq.zoo``.
"""

from ._errors import CalibrationFileError, ConfigError, DataError, MixqError, ModelStructureError
from .api import FP8, INT8, W4A8, CompiledModel, Preset, compile, load, quantize  # tensors: primitives.quantize
from .calibration import load_calibration_config, save_calibration_config, validate_calibration_config
from .config import resolve_config
from .primitives import choose_qparams, choose_qparams_from_tensor, dequantize, fake_quantize
from .quantization import (
    LSQ,
    PTQ,
    QAT,
    DoReFa,
    QuantWrapper,
    calibrate_,
    defer_range_sync,
    deploy_model,
    export_calibration,
    freeze_,
    prepare_,
    quantized_layers,
    sync_ranges,
)
from .search import search
from .spec import FP8_E4M3, FloatType, IntType, LayerSpec, PerChannel, PerTensor, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "compile",
    "load",
    "CompiledModel",
    "Preset",
    "INT8",
    "FP8",
    "W4A8",
    "MixqError",
    "ConfigError",
    "CalibrationFileError",
    "ModelStructureError",
    "DataError",
    "IntType",
    "FloatType",
    "FP8_E4M3",
    "PerTensor",
    "PerChannel",
    "QuantSpec",
    "LayerSpec",
    "choose_qparams",
    "choose_qparams_from_tensor",
    "dequantize",
    "fake_quantize",
    "resolve_config",
    "QAT",
    "PTQ",
    "LSQ",
    "DoReFa",
    "QuantWrapper",
    "prepare_",
    "calibrate_",
    "freeze_",
    "quantized_layers",
    "export_calibration",
    "deploy_model",
    "defer_range_sync",
    "sync_ranges",
    "save_calibration_config",
    "load_calibration_config",
    "validate_calibration_config",
    "search",
]
