"""Float model + calibration config -> ONNX with explicit QuantizeLinear/DequantizeLinear (the one intermediate form).

Per configured layer: a Q/DQ pair on its input and output where the config quantizes them, and the weight
stored as an int8 initializer (per channel where the config says so) feeding a DequantizeLinear, with the
exported scales and zero points used verbatim. 16-bit layers are marked ``fp16`` (TensorRT runs them in
half precision; ONNX Runtime's CPU provider has no fast fp16 kernels, so they stay float there and the
placement report says so). Layers not in the config run at ``extra_layer_bits`` (32: float). The batch
dimension is dynamic. ``nn.MultiheadAttention`` is exported as :class:`mixq.attention.ExplicitMultiheadAttention`
(Linear projections, MatMul/Softmax attention; LayerNorm, Softmax and GELU stay float).

fp8 layers (e4m3, ``"dtype": "fp8"`` in their qspecs) take ONNX's float8 form, and the model opset 19 (13 when no
layer is fp8, 17 when the model has LayerNorm: :func:`graph_opset`): activations ``QuantizeLinear(x, scale, zp) ->
DequantizeLinear`` with a float32 scalar scale and a ``FLOAT8E4M3FN`` zero point 0; weights a ``FLOAT8E4M3FN``
initializer (quantized here by :func:`mixq.primitives.quantize`, so it holds what the fake-quant model computed)
feeding a ``DequantizeLinear`` (float32 scales, ``FLOAT8E4M3FN`` zero points, axis 0); their bias stays float.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._errors import CalibrationFileError, ConfigError, MixqError
from ._io import atomic_write
from .attention import explicit_attention_, has_torch_attention
from .calibration import validate_calibration_config
from .config import QUANTIZABLE_OP_TYPES, TWO_INPUT_OP_TYPES, WEIGHTED_OP_TYPES
from .primitives import FP8_TORCH_DTYPE, choose_qparams, fake_quantize, fake_quantize_fp8, fold_batchnorm, quantize
from .spec import FP8_DTYPE, FP8_E4M3, QUANT_TYPES, SECOND_INPUT, IntType, QuantSpec

__all__ = [
    "QDQExport",
    "export_qdq_onnx",
    "export_float_onnx",
    "layer_precisions",
    "constant_resolver",
    "LAYERS_METADATA_KEY",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OPSET",
    "FP8_OPSET",
    "LAYER_NORM_OPSET",
    "graph_opset",
]

LAYERS_METADATA_KEY = "mixq.layers"
INPUT_NAME, OUTPUT_NAME = "input", "output"
OPSET = 13
FP8_OPSET = 19  # the first with float8 QuantizeLinear / DequantizeLinear
LAYER_NORM_OPSET = 17  # the first with LayerNormalization
QUANTIZED = ("int8", "fp8")  # the layer precisions that carry Q/DQ
_FP8_DOMAIN, _FP8_MARKER = "mixq.fp8", "Fp8QDQ"  # the trace's stand-in for a float8 Q/DQ pair, lowered after export
_ACT_DEFAULT = {"bits": 8, "dtype": "uint", "scheme": "per_tensor_affine", "axis": None}
_WEIGHT_DEFAULT = {"bits": 8, "dtype": "int", "scheme": "per_channel_symmetric", "axis": 0}


@dataclass(frozen=True)
class QDQExport:
    """The exported ONNX model and what each layer asked for (``{layer: {"precision", "op_type", ...}}``)."""

    model: object  # onnx.ModelProto
    layers: dict

    @property
    def requests_quantized(self) -> bool:
        """Whether any layer asks for a precision other than fp32."""
        return any(info["precision"] != "fp32" for info in self.layers.values())

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_write(path, "wb") as f:
            f.write(self.model.SerializeToString())
        return Path(path)


def layer_precisions(calibration: dict, extra_layer_bits: int = 32) -> dict[str, str]:
    """``{layer: "int8" | "fp8" | "fp16"}`` for each configured layer; errors name a layer that no engine can build.

    int8 layers have 8-bit activations and 2..8-bit weights (narrower weights are stored in int8 on their
    own grid: e.g. 7-bit weights keep ONNX Runtime's fast u8 x s8 kernels exact on CPUs without VNNI).
    fp8 layers have every quantized type in fp8 (e4m3); a layer mixing fp8 and integer types is an error.
    fp16 layers have 16 bits everywhere.
    """
    if extra_layer_bits not in (16, 32):
        raise ConfigError(f"extra_layer_bits must be 16 or 32, got {extra_layer_bits}")
    out = {}
    for name, entry in calibration.items():
        fp8 = [t for t in QUANT_TYPES if f"{t}_bits" in entry and _is_fp8(entry, t)]
        if fp8:
            ints = [t for t in QUANT_TYPES if f"{t}_bits" in entry and t not in fp8]
            if ints:
                raise CalibrationFileError(
                    f"layer {name!r} mixes fp8 ({', '.join(fp8)}) and integer ({', '.join(ints)}) quantization; "
                    "engines build a layer in fp8 or in int8 throughout"
                )
            out[name] = "fp8"
            continue
        act = {entry[f"{t}_bits"] for t in ("input", "output") if f"{t}_bits" in entry}
        weight = entry.get("weight_bits")
        every = act | ({weight} if weight is not None else set())
        if not every:
            raise CalibrationFileError(f"layer {name!r}: no input_bits, weight_bits or output_bits")
        if every == {16}:
            out[name] = "fp16"
        elif act <= {8} and (weight is None or 2 <= weight <= 8):
            out[name] = "int8"
        else:
            raise CalibrationFileError(
                f"layer {name!r} asks for {sorted(every)} bits; engines build int8 layers (8-bit activations, "
                "2..8-bit weights) and fp16 layers (16 bits throughout); 32 bits: leave the layer out"
            )
    return out


def _is_fp8(entry: dict, t: str) -> bool:
    qspec = entry.get(f"{t}_qspec")
    return isinstance(qspec, dict) and qspec.get("dtype") == FP8_DTYPE


def _weight_spec(entry: dict) -> QuantSpec:
    return QuantSpec.from_dict(entry.get("weight_qspec") or {**_WEIGHT_DEFAULT, "bits": entry["weight_bits"]})


class _Fp8Marker(torch.autograd.Function):
    """:func:`~mixq.primitives.fake_quantize_fp8` in torch; in the ONNX trace one ``Fp8QDQ`` node carrying the
    scales, which :func:`_lower_fp8` turns into the float8 QuantizeLinear/DequantizeLinear form."""

    @staticmethod
    def forward(ctx, x, scales: tuple[float, ...], axis: int):
        per_channel = len(scales) > 1
        scale = torch.tensor(scales if per_channel else scales[0], dtype=torch.float32)
        return fake_quantize_fp8(x, scale, axis if per_channel else None)

    @staticmethod
    def symbolic(g, x, scales, axis):
        out = g.op(f"{_FP8_DOMAIN}::{_FP8_MARKER}", x, scales_f=list(scales), axis_i=axis)
        out.setType(x.type())
        return out


class _Fp8QDQ(nn.Module):
    """An fp8 activation's Q/DQ pair (per tensor)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scales = (float(torch.tensor(scale, dtype=torch.float32)),)

    def forward(self, x):
        return _Fp8Marker.apply(x, self.scales, 0)


class _ActQDQ(nn.Module):
    def __init__(self, scale: float, zero_point: int, signed: bool):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.qmin, self.qmax = (-128, 127) if signed else (0, 255)

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


class _QDQLayer(nn.Module):
    """Export-time stand-in for one configured layer: Q/DQ around it, its weight through Q/DQ."""

    def __init__(self, module: nn.Module, entry: dict, name: str):
        super().__init__()
        self.module = module
        self.input_qdq = _act_qdq(entry, "input", name)
        # A MatMul's second operand: the input's bits and format, its own scale and zero point.
        two_inputs = type(module).__name__ in TWO_INPUT_OP_TYPES
        self.input1_qdq = _act_qdq(entry, "input", name, slot=SECOND_INPUT) if two_inputs else None
        self.output_qdq = _act_qdq(entry, "output", name)
        self.weighted = type(module).__name__ in WEIGHTED_OP_TYPES
        self.weight_axis = None
        self.weight_fp8 = None  # (scales, axis) of fp8 weights
        if self.weighted and "weight_bits" in entry and _is_fp8(entry, "weight"):
            spec = _weight_spec(entry)
            scales = tuple(float(v) for v in torch.tensor(entry["weight_scale"], dtype=torch.float32).reshape(-1))
            _check_weight_scales(len(scales), module, spec, name)
            self.weight_fp8 = (scales, spec.axis or 0)
        elif self.weighted and "weight_bits" in entry:
            spec = _weight_spec(entry)
            scale = torch.tensor(entry["weight_scale"], dtype=torch.float32).reshape(-1)
            zp = torch.tensor(entry["weight_zero_point"], dtype=torch.int32).reshape(-1)
            _check_weight_scales(scale.numel(), module, spec, name)
            self.weight_axis = spec.axis if scale.numel() > 1 else None
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zp)
            # Narrow weights keep their grid inside an 8-bit container (the values never leave the narrow range).
            self.weight_range = (-128, 127) if spec.dtype.signed else (0, 255)

    def forward(self, x, *args, **kwargs):
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        if self.input1_qdq is not None and args:
            args = (self.input1_qdq(args[0]), *args[1:])
        m = self.module
        if self.weight_fp8 is not None:
            w = _Fp8Marker.apply(m.weight, *self.weight_fp8)
        elif self.weighted and self.weight_axis is not None:
            w = torch.fake_quantize_per_channel_affine(
                m.weight, self.weight_scale, self.weight_zero_point, self.weight_axis, *self.weight_range
            )
        elif self.weighted and hasattr(self, "weight_scale"):
            w = torch.fake_quantize_per_tensor_affine(
                m.weight, float(self.weight_scale[0]), int(self.weight_zero_point[0]), *self.weight_range
            )
        else:
            w = None
        if w is None:
            out = m(x, *args, **kwargs)
        elif isinstance(m, nn.Linear):
            out = F.linear(x, w, m.bias)
        else:
            out = m._conv_forward(x, w, m.bias)
        if self.output_qdq is not None:
            out = self.output_qdq(out)
        return out


def _check_weight_scales(count: int, module: nn.Module, spec: QuantSpec, name: str) -> None:
    channels = module.weight.shape[spec.axis or 0]
    if count not in (1, channels):
        raise CalibrationFileError(
            f"layer {name!r}: {count} weight scales for a weight with {channels} output channels"
        )


def _act_qdq(entry: dict, t: str, name: str, slot: str | None = None) -> _ActQDQ | _Fp8QDQ | None:
    """The Q/DQ pair of quant type ``t`` (its bits and qspec); ``slot`` names the entry's keys of the scale,
    zero point and range where they are not ``t``'s own (a MatMul's second operand)."""
    if f"{t}_bits" not in entry or entry[f"{t}_bits"] != 8:
        return None
    spec = QuantSpec.from_dict(entry.get(f"{t}_qspec") or _ACT_DEFAULT)
    slot = slot or t
    if slot != t and f"{slot}_scale" not in entry and f"tracked_min_{slot}" not in entry:
        raise CalibrationFileError(
            f"layer {name!r}: a MatMul quantizes both operands; its entry lacks the second's range "
            f"(tracked_min_{slot} / tracked_max_{slot}, or {slot}_scale / {slot}_zero_point)"
        )
    if f"{slot}_scale" in entry:
        scale, zp = entry[f"{slot}_scale"], entry[f"{slot}_zero_point"]
    else:  # NNI-style entry: only the tracked range
        s, z = choose_qparams(entry[f"tracked_min_{slot}"], entry[f"tracked_max_{slot}"], spec)
        scale, zp = float(s), int(z)
    if isinstance(scale, list):
        raise CalibrationFileError(f"layer {name!r}: per-channel {t} quantization cannot be exported")
    if spec.is_float:
        return _Fp8QDQ(scale)
    return _ActQDQ(scale, zp, spec.dtype.signed)


def export_float_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], device=None) -> Path:
    """Export a float model to ONNX (dynamic batch dimension) atomically."""
    path = Path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model.to(device).eval()
    if has_torch_attention(model):
        model = explicit_attention_(copy.deepcopy(model))  # torch's fused attention has no ONNX form
    dummy = torch.randn(*input_shape, device=device)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # The TorchScript exporter needs no onnxscript; torch 2.9+ warns that it is the legacy path.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                dynamo=False,
            )
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, MixqError):
            raise
        raise MixqError(f"ONNX export of {type(model).__name__} to {path} failed: {type(e).__name__}: {e}") from e
    return path


def export_qdq_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    calibration: dict,
    extra_layer_bits: int = 32,
    path: str | os.PathLike | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> QDQExport:
    """Build the Q/DQ ONNX model of ``model`` for inputs of ``input_shape`` (batch dimension dynamic).

    ``model`` is the float model (e.g. the state dict ``export_model`` wrote, loaded into the original
    architecture) and ``calibration`` its calibration config; nothing here knows about quantizer wrappers
    (``mixq.speedup`` turns a prepared model into this pair). Every configured layer must exist in the model.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if calibration is None:
        raise ConfigError(f"{type(model).__name__}: export_qdq_onnx needs its calibration config")
    float_model = explicit_attention_(copy.deepcopy(model).cpu().eval())  # MatMul/Softmax, Linear projections
    validate_calibration_config(calibration)
    precisions = layer_precisions(calibration, extra_layer_bits)
    modules = dict(float_model.named_modules())
    _check_calibration_matches(type(model).__name__, modules, calibration)
    dummy = torch.randn(*input_shape)
    calibration = _fold_remaining_batchnorms(float_model, calibration, precisions, dummy[:1])
    modules = dict(float_model.named_modules())
    layers = {}
    for name, entry in calibration.items():
        module = modules[name]
        op_type = type(module).__name__
        if op_type not in QUANTIZABLE_OP_TYPES:
            raise CalibrationFileError(f"layer {name!r} is a {op_type}, which cannot be quantized")
        _absorb_folded_bn(float_model, modules, name, entry)
        layers[name] = {"op_type": op_type, "precision": precisions[name]}
        if precisions[name] in QUANTIZED:
            float_model.set_submodule(name, _QDQLayer(module, entry, name))
    extra = "fp16" if extra_layer_bits == 16 else "fp32"
    for name, module in modules.items():
        op_type = type(module).__name__
        # An attention matmul the config leaves out is part of the float attention (a backend may fuse it), not a
        # float layer of its own.
        if name and name not in layers and op_type in QUANTIZABLE_OP_TYPES and op_type not in TWO_INPUT_OP_TYPES:
            layers[name] = {"op_type": op_type, "precision": extra}

    fp8 = "fp8" in precisions.values()
    buffer = io.BytesIO()
    try:
        unfolded = [n for n, info in layers.items() if info["precision"] in QUANTIZED and "Conv" in info["op_type"]]
        for conv, bn in _convs_feeding_batchnorm(float_model, unfolded, dummy[:1]).items():
            layers[conv]["unfolded_bn"] = bn  # the placement note names the cause when the conv runs float
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                float_model,
                (dummy,),
                buffer,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=graph_opset(float_model, fp8),
                do_constant_folding=True,
                dynamo=False,
                **({"custom_opsets": {_FP8_DOMAIN: 1}} if fp8 else {}),
            )
    except MixqError:
        raise
    except Exception as e:
        raise _export_failure(type(model).__name__, input_shape, e) from e
    proto = onnx.load_from_string(buffer.getvalue())
    _inline_constant_identities(proto)
    _fold_weight_quantize(proto)
    for node_name in _quantize_gemm_bias(proto):
        scope = node_name.split("/")
        for layer in layers:
            if layer in scope:
                layers[layer]["float_bias"] = True  # the report says why this layer may run float
    if fp8:
        _lower_fp8(proto)  # after the Gemm bias pass: an fp8 layer's bias stays float
    meta = proto.metadata_props.add()
    meta.key, meta.value = LAYERS_METADATA_KEY, json.dumps(layers)
    onnx.checker.check_model(proto)
    result = QDQExport(proto, layers)
    if path is not None:
        result.save(path)
    return result


def graph_opset(model: nn.Module, fp8: bool) -> int:
    """The opset for ``model``'s graph: 19 with fp8 layers (float8 Q/DQ), 17 when it has LayerNorm (one ONNX
    LayerNormalization node instead of its ReduceMean/Pow/Sqrt decomposition), else 13 (int8 CNN graphs stay
    as they were)."""
    if fp8:
        return FP8_OPSET
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        return LAYER_NORM_OPSET
    return OPSET


def _export_failure(model_name: str, input_shape, e: Exception) -> MixqError:
    """One line naming the operator the exporter could not write and what to do about it."""
    text = str(e).splitlines()[0] if str(e) else ""
    match = re.search(r"operator '([^']+)'", text)
    if match:
        return MixqError(
            f"ONNX export of {model_name} with input shape {tuple(input_shape)} failed: no ONNX form for "
            f"{match.group(1)} (TorchScript exporter, opset chosen by mixq.export.graph_opset); rewrite that "
            "part of the model with ONNX-exportable torch ops (as mixq.attention does for nn.MultiheadAttention), "
            "or keep it out of the exported module"
        )
    return MixqError(
        f"ONNX export of {model_name} with input shape {tuple(input_shape)} failed: {type(e).__name__}: {text}"
    )


def _names(names: list[str], limit: int) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_calibration_matches(model_name: str, modules: dict, calibration: dict) -> None:
    """One error naming every layer (up to a few) where the calibration config and the model disagree:
    a layer the model lacks, another op type, a folded_bn that is not a BatchNorm."""
    missing = [n for n in calibration if not n or n not in modules]
    problems = []
    if missing:
        problems.append(
            f"layer {_names(missing, 4)} is not in the model"
            if len(missing) == 1
            else f"layers {_names(missing, 4)} are not in the model"
        )
    for name, entry in calibration.items():
        if name in missing:
            continue
        op_type = type(modules[name]).__name__
        if entry.get("op_type", op_type) != op_type:
            problems.append(f"layer {name!r} is a {op_type} in the model but a {entry['op_type']} in the config")
        bn = entry.get("folded_bn")
        if bn and not isinstance(modules.get(bn), nn.modules.batchnorm._BatchNorm):
            what = f"is a {type(modules[bn]).__name__}, not a BatchNorm" if bn in modules else "the model lacks"
            problems.append(f"layer {name!r} has folded_bn {bn!r}, which {what}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        made_for = list(dict.fromkeys([*calibration, *(e.get("folded_bn") for e in calibration.values())]))
        made_for = [n for n in made_for if n]
        listed = ", ".join(repr(n) for n in made_for[:6]) + (", ..." if len(made_for) > 6 else "")
        raise CalibrationFileError(
            f"the calibration config does not match {model_name}: {shown}; "
            f"it was made for a model with layers [{listed}]"
        )


def _convs_feeding_batchnorm(model: nn.Module, convs: list[str], example: torch.Tensor) -> dict[str, str]:
    """``{conv: bn}`` for each of ``convs`` whose output goes straight into a BatchNorm (one forward pass with
    hooks, so any model that runs works): an unfolded BatchNorm keeps a backend from running the conv in int8."""
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    found: dict[str, str] = {}

    def after_conv(name):
        return lambda _m, _args, out: outputs.__setitem__(id(out), (name, out))

    def before_bn(name):
        def hook(_m, args):
            hit = outputs.get(id(args[0])) if args else None
            if hit is not None and hit[1] is args[0]:
                found.setdefault(hit[0], name)

        return hook

    bns = {n: m for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not convs or not bns:
        return {}
    hooks = [modules[c].register_forward_hook(after_conv(c)) for c in convs]
    hooks += [m.register_forward_pre_hook(before_bn(n)) for n, m in bns.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return found


def _fold_remaining_batchnorms(model: nn.Module, calibration: dict, precisions: dict, example) -> dict:
    """Fold each BatchNorm that directly follows an int8 conv the quantizer did not fold (no ``dummy_input``):
    the conv's integer weights stay as trained and each output channel's weight scale is multiplied by
    ``|gamma / sqrt(var + eps)|`` (a negative factor flips the integers' sign, exact for symmetric weights);
    the BatchNorm's shift goes into the bias. The result computes what the fake-quant model computes, so
    the engine no longer depends on whether the user passed ``dummy_input``. Returns the calibration with
    those entries updated (the caller's dict is not changed); ``model`` is changed in place.

    Not folded (the conv then feeds a float BatchNorm, and the placement report says why): a conv whose
    output is quantized (the quantizer rounded before the BatchNorm), affine weights with a negative factor,
    a BatchNorm without running statistics, and any fold that would change the float model's output (the
    conv's output also feeds something else)."""
    modules = dict(model.named_modules())
    candidates = [
        n
        for n, e in calibration.items()
        if precisions.get(n) in QUANTIZED
        and isinstance(modules[n], nn.Conv1d | nn.Conv2d)
        and "weight_bits" in e
        and "output_bits" not in e
        and not e.get("folded_bn")
    ]
    pairs = _convs_feeding_batchnorm(model, candidates, example)
    if not pairs:
        return calibration
    saved = {n: copy.deepcopy(modules[n]) for pair in pairs.items() for n in pair}
    entries = {c: _folded_entry(calibration[c], modules[c], modules[bn], bn) for c, bn in pairs.items()}
    entries = {c: e for c, e in entries.items() if e is not None}
    for conv in entries:  # on the grid first, the reference included: the fold must not move an integer
        _snap_weight_to_grid(modules[conv], calibration[conv])
    with torch.no_grad():
        reference = model(example)
    folded = dict(calibration)
    for conv, entry in entries.items():
        folded[conv] = entry
        _absorb_folded_bn(model, modules, conv, entry)
    with torch.no_grad():
        after = model(example)
    same = (
        isinstance(after, torch.Tensor)
        and isinstance(reference, torch.Tensor)
        and torch.allclose(after, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    )
    if not same:
        for name, module in saved.items():  # a conv output with another user: undo every fold
            model.set_submodule(name, module)
        return calibration
    return folded


def _folded_entry(entry: dict, conv: nn.Module, bn: nn.Module, bn_name: str) -> dict | None:
    if not (bn.track_running_stats and bn.affine and bn.running_var is not None):
        return None
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    channels = conv.weight.shape[0]
    spec = _weight_spec(entry)
    scales = torch.tensor(entry["weight_scale"], dtype=torch.float64).reshape(-1).expand(channels)
    zps = torch.tensor(entry["weight_zero_point"], dtype=torch.int64).reshape(-1).expand(channels)
    if (factor < 0).any() and bool((zps != 0).any()):
        return None  # an affine grid does not flip onto itself
    if (factor < 0).any() and not spec.is_float:  # fp8's grid is symmetric about 0
        q = torch.round(conv.weight.detach().double() / scales.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        if bool((q <= spec.dtype.qmin).any()) and -spec.dtype.qmin > spec.dtype.qmax:
            return None  # qmin (e.g. -128, reachable with LSQ) has no positive counterpart to flip to
    if (factor == 0).any():
        return None
    qspec = {**spec.to_dict(), "scheme": spec.scheme.replace("per_tensor", "per_channel"), "axis": 0}
    return {
        **entry,
        "folded_bn": bn_name,
        "weight_scale": (scales * factor.abs()).float().tolist(),
        "weight_zero_point": zps.tolist(),
        "weight_qspec": qspec,
    }


def _snap_weight_to_grid(conv: nn.Module, entry: dict) -> None:
    """Put the conv's weight exactly on its quantization grid before a fold scales it, so the folded weight
    divided by the folded scale rounds to the same integers (or fp8 values): no value near a rounding tie can move."""
    spec = _weight_spec(entry)
    scale = torch.tensor(entry["weight_scale"], dtype=torch.float32).reshape(-1)
    zp = torch.tensor(entry["weight_zero_point"], dtype=torch.int32).reshape(-1)
    with torch.no_grad():
        conv.weight.copy_(fake_quantize(conv.weight, scale, zp, spec.dtype, 0 if scale.numel() > 1 else None))


def _absorb_folded_bn(model: nn.Module, modules: dict, name: str, entry: dict) -> None:
    """Fold the BatchNorm named by ``folded_bn`` into the conv (same arithmetic as the quantizer's folding,
    so the weights match the exported weight scales) and replace it by an identity. Works for the
    identity BN that ``deploy_model`` leaves and for the original trained BN alike."""
    bn_name = entry.get("folded_bn")
    if not bn_name:
        return
    bn = modules[bn_name]  # checked by _check_calibration_matches
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return  # folded already, by _fold_remaining_batchnorms
    conv = modules[name]
    with torch.no_grad():
        weight, bias = fold_batchnorm(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
        )
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias)
    model.set_submodule(bn_name, nn.Identity())


def constant_resolver(model, required: bool = False):
    """A function giving the value (ndarray) of a tensor name that is an initializer or a Constant node,
    followed through Identity nodes (the exporter deduplicates equal initializers that way). Anything else
    gives None, or an error when ``required``."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node if n.op_type in ("Constant", "Identity")}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is None:
            if required:
                raise MixqError(f"ONNX export: quantization parameter {name!r} is not a constant")
            return None
        if node.op_type == "Identity":
            return value(node.input[0])
        return numpy_helper.to_array(node.attribute[0].t)

    return value


def _inline_constant_identities(model) -> None:
    """Point the readers of ``Identity(initializer)`` at the initializer itself and drop the Identity. The
    exporter writes one initializer for equal tensors and an Identity for each other use (layers deep-copied
    from one template, as ``nn.TransformerEncoder`` builds them, start with equal weights): a weight's
    QuantizeLinear must read the initializer to be folded, and backends see a weight as a constant."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    }
    if not alias:
        return
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _fold_weight_quantize(model) -> None:
    """Replace QuantizeLinear(initializer) by the quantized initializer, computed as ONNX would (round half
    to even, saturate to the zero point's type) by :func:`mixq.primitives.quantize`."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    value = constant_resolver(model, required=True)

    keep = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            x, scale, zp = value(node.input[0]), value(node.input[1]), value(node.input[2])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.size > 1 else None
            info = np.iinfo(zp.dtype)
            grid = IntType(info.bits, info.min < 0)
            x, scale, zp = (torch.from_numpy(np.array(v)) for v in (x.astype(np.float32), scale, zp))
            q = quantize(x, scale, zp, grid, axis)
            model.graph.initializer.append(numpy_helper.from_array(q.numpy().astype(info.dtype), name=node.output[0]))
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    _drop_unused_initializers(model)


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def _quantize_gemm_bias(model) -> list[str]:
    """Give each Gemm whose input and weight are dequantized an int32 bias behind a DequantizeLinear
    (scale = input scale x weight scale, zero point 0), the form ONNX Runtime needs to run a Gemm with a
    float output as QGemm. The bias moves by at most half an accumulator step (|error| <= s_in * s_w / 2)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    const = constant_resolver(model)

    float_bias: list[str] = []
    new_nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        a, b = producers.get(node.input[0]), producers.get(node.input[1])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        trans_b = next((att.i for att in node.attribute if att.name == "transB"), 0)
        s_a, s_b = const(a.input[1]), const(b.input[1])
        if s_a is None or s_b is None or s_a.size != 1 or (s_b.size > 1 and not trans_b):
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        scale = (np.float64(s_a.reshape(())) * s_b.astype(np.float64)).astype(np.float32)
        scale = np.broadcast_to(scale, bias.shape).copy() if scale.size > 1 or bias.size > 1 else scale
        steps = np.rint(bias / scale.astype(np.float64))
        if np.abs(steps).max(initial=0) > 2**31 - 1:
            # An output channel with (near) zero weights has a tiny weight scale: its bias does not fit an
            # int32 accumulator step. Keep this Gemm's bias float (exact; the backend may run it in float).
            float_bias.append(node.name)
            continue
        q = steps.astype(np.int32)
        base = node.input[2]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}_quantized"),
                numpy_helper.from_array(scale.reshape(-1) if scale.size > 1 else scale.reshape(()), f"{base}_scale"),
                numpy_helper.from_array(np.zeros(q.shape if scale.size > 1 else (), np.int32), f"{base}_zero_point"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
            [f"{base}_dequantized"],
            name=f"{node.name.rsplit('/', 1)[0]}/BiasDequantizeLinear",
            **({"axis": 0} if scale.size > 1 else {}),
        )
        new_nodes.append((node, dq))
        node.input[2] = f"{base}_dequantized"
    for gemm, dq in new_nodes:
        idx = list(model.graph.node).index(gemm)
        model.graph.node.insert(idx, dq)
    _drop_unused_initializers(model)
    return float_bias


def _lower_fp8(model) -> None:
    """Replace each ``Fp8QDQ`` stand-in by the contract's float8 form: on a constant (a weight) a FLOAT8E4M3FN
    initializer quantized by :func:`mixq.primitives.quantize` feeding a DequantizeLinear (axis 0); elsewhere a
    QuantizeLinear -> DequantizeLinear pair. Scales are float32 (scalar, or one per channel), zero points
    FLOAT8E4M3FN zeros of the same shape. Names follow the int8 form's (``/fc1/input_qdq/QuantizeLinear``)."""
    from onnx import TensorProto, helper, numpy_helper

    value = constant_resolver(model)
    taken = {i.name for i in model.graph.initializer}

    def initializer(name: str, tensor) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        tensor.name = name
        model.graph.initializer.append(tensor)
        return name

    def fp8_tensor(q: torch.Tensor):  # a torch.float8_e4m3fn tensor, as its bytes
        raw = q.contiguous().view(torch.uint8).numpy().tobytes()
        return helper.make_tensor("", TensorProto.FLOAT8E4M3FN, list(q.shape), raw, raw=True)

    graph_outputs = {o.name for o in model.graph.output}
    renamed = {}  # a stand-in's output -> its DequantizeLinear's (a graph output keeps its name)
    nodes = []
    for node in model.graph.node:
        if node.domain != _FP8_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: a for a in node.attribute}
        scales = np.asarray(attrs["scales"].floats, dtype=np.float32)
        scale = torch.from_numpy(scales if scales.size > 1 else scales.reshape(()))
        weight = value(node.input[0])
        base = node.input[0] if weight is not None else node.name.rsplit("/", 1)[0]
        s_name = initializer(f"{base}_scale", numpy_helper.from_array(scale.numpy()))
        z_name = initializer(f"{base}_zero_point", fp8_tensor(torch.zeros(scale.shape, dtype=FP8_TORCH_DTYPE)))
        dq_node = node.name.replace(_FP8_MARKER, "DequantizeLinear")
        out = node.output[0] if node.output[0] in graph_outputs else f"{dq_node}_output_0"
        renamed[node.output[0]] = out
        if weight is not None:
            axis = attrs["axis"].i
            w = torch.from_numpy(np.array(weight, dtype=np.float32))  # a writable copy
            q = quantize(w, scale, None, FP8_E4M3, axis if scale.dim() == 1 else None)
            q_name, dq_args = initializer(f"{base}_quantized", fp8_tensor(q)), {"axis": axis}
        else:
            q_node = node.name.replace(_FP8_MARKER, "QuantizeLinear")
            q_name, dq_args = f"{q_node}_output_0", {}
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], s_name, z_name], [q_name], q_node))
        nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], dq_node, **dq_args))
    for node in nodes:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for opset in [o for o in model.opset_import if o.domain == _FP8_DOMAIN]:
        model.opset_import.remove(opset)
    _drop_unused_initializers(model)
