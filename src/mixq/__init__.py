"""mixq: mixed-precision quantization that really runs faster.

Importing mixq loads torch only: no CUDA initialisation, no ONNX Runtime or TensorRT import.

Layers, bottom up. A module imports only from layers below its own (or from its own name); names on one line
are siblings and do not import each other. Names are under ``mixq.``; each stands for that module or package
and everything under it, the most specific name listed wins; ``mixq`` is this file only
(``tests/test_layering.py`` reads this list and checks it, and that no module imports itself in a circle):

1. ``_errors``
2. ``_io``, ``_timing``, ``distributed``: files, timing loops, process groups
3. ``spec``
4. ``primitives``, ``attention``: pure quantization math; explicit multi-head attention (Linear projections)
5. ``observers``
6. ``config``
7. ``calibration``: the calibration file format
8. ``quantization``, ``export``: fake-quant modules and the model verbs; float model + calibration -> Q/DQ ONNX
9. ``backends.errors``
10. ``backends.onnx_graph``: the Q/DQ ONNX graph helpers every backend's legalization shares
11. ``backends.base``: the backend interface, registry and engine file
12. ``backends.profiling``, ``backends.cpu_features``
13. ``backends.onnxruntime``, ``backends.openvino``, ``backends.tensorrt``, ``backends.cuda``: one per engine
14. ``backends``: the registry's entry point (registers every engine)
15. ``report``: placement and per-layer time tables
16. ``auto``
17. ``speedup``: orchestration
18. ``search``, ``api``, ``train``: mixed-precision search; the native verbs ``quantize``, ``compile``, ``load``;
    the QAT/PTQ loops ``mixq quantize`` runs
19. ``mixq``: this package's public names
20. ``zoo``: demo, test and benchmark support (models, data sets, download, demo, tutorial assets, metrics)
21. ``nni``: the NNI 2.x face
22. ``cli``
23. ``__main__``
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
