"""Drop-in names for users of NNI 2.x's quantization: change the import, keep the code.

from mixq.nni import QAT_Quantizer            # was: from nni.algorithms.compression.pytorch.quantization import ...
from mixq.nni import set_quant_scheme_dtype   # was: from nni.compression.pytorch.quantization.settings import ...
from mixq.nni import ModelSpeedupTensorRT     # was: from nni.compression.pytorch.quantization_speedup import ...
from mixq.nni import ModelSpeedup as ModelSpeedupTensorRT   # the same, on whatever engine this machine runs

docs/nni.md lists every NNI quantization API, its counterpart here and each difference.
"""

from ..calibration import load_calibration_config
from .quantizers import DoReFaQuantizer, LsqQuantizer, ObserverQuantizer, QAT_Quantizer, Quantizer
from .settings import reset_quant_scheme_dtype, set_quant_scheme_dtype
from .speedup import CalibrateType, ModelSpeedup, ModelSpeedupTensorRT

__all__ = [
    "Quantizer",
    "QAT_Quantizer",
    "ObserverQuantizer",
    "LsqQuantizer",
    "DoReFaQuantizer",
    "set_quant_scheme_dtype",
    "reset_quant_scheme_dtype",
    "load_calibration_config",
    "ModelSpeedup",
    "ModelSpeedupTensorRT",
    "CalibrateType",
]
