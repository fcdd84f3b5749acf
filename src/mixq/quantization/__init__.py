"""Quantization, in three levels named by what they hold: ``fake_quant`` (one module per quantized tensor),
``wrapper`` (one :class:`QuantWrapper` per configured layer, with its folded BatchNorm) and ``model`` (the
verbs on a whole model: ``prepare_``, ``calibrate_``, ``freeze_``, ``export_calibration``, ``deploy_model``)."""

from .model import (
    calibrate_,
    deploy_model,
    export_calibration,
    find_conv_bn_pairs,
    freeze_,
    prepare_,
    quantized_layers,
)
from .sync import defer_range_sync, sync_ranges
from .wrapper import LSQ, PTQ, QAT, DoReFa, Method, QuantWrapper

__all__ = [
    "QAT",
    "PTQ",
    "LSQ",
    "DoReFa",
    "Method",
    "QuantWrapper",
    "prepare_",
    "calibrate_",
    "freeze_",
    "quantized_layers",
    "export_calibration",
    "deploy_model",
    "find_conv_bn_pairs",
    "defer_range_sync",
    "sync_ranges",
]
