"""Drop-in names for users of NNI's quantization tutorial: change the import, keep the code.

from mixq.nni import QAT_Quantizer          # was: from nni.compression.pytorch.quantization import ...
"""

from ..calibration import load_calibration_config
from ..speedup import ModelSpeedup
from .quantizers import DoReFaQuantizer, LsqQuantizer, ObserverQuantizer, QAT_Quantizer
from .speedup import CalibrateType, ModelSpeedupTensorRT

__all__ = [
    "QAT_Quantizer",
    "ObserverQuantizer",
    "LsqQuantizer",
    "DoReFaQuantizer",
    "load_calibration_config",
    "ModelSpeedup",
    "ModelSpeedupTensorRT",
    "CalibrateType",
]
