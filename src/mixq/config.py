"""NNI-compatible ``config_list`` validation and resolution into one frozen :class:`LayerSpec` per layer.

Precedence is NNI's: every named module is checked against the entries in order; the *last* matching
entry wins whole (entries are not merged), and a matching ``exclude`` entry removes the module. Unlike
NNI, anything that would silently match nothing is an error: unknown keys, unknown ``op_names``,
``op_types`` that no module has, entries that match no module.

``quant_dtype`` takes ``'fp8'`` besides NNI's ``'int'``/``'uint'``: float8 e4m3 (see :class:`~mixq.spec.FloatType`),
with ``quant_bits`` 8 and a symmetric scheme (by default per-tensor for activations, per-channel for weights).

One key is mixq's own: ``quant_convention`` (``'mixq'``, the default, or ``'nni'``, per quant type like
``quant_bits``) picks NNI 2.x's integer conventions (narrow int range, uint symmetric zero point 127; see
:class:`~mixq.spec.QuantSpec`). ``mixq.nni.QAT_Quantizer`` sets it where NNI's scheme/dtype settings are given.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections.abc import Mapping, Sequence

from torch import nn

from ._errors import ConfigError
from .attention import explicit_attention_, has_torch_attention
from .observers import ENTROPY_FP8_ERROR, OBSERVERS
from .spec import (
    CONVENTIONS,
    DTYPES,
    FORMAT_KEY,
    FP8_DTYPE,
    FP8_E4M3,
    MAX_BITS,
    MIN_BITS,
    QUANT_TYPES,
    SCHEMES,
    TWO_INPUT_OP_TYPES,
    WEIGHTED_OP_TYPES,
    LayerSpec,
    QuantSpec,
)

__all__ = [
    "WEIGHTED_OP_TYPES",
    "TWO_INPUT_OP_TYPES",
    "ACTIVATION_OP_TYPES",
    "DEFAULT_SCHEME",
    "DEFAULT_DTYPE",
    "FP8_DEFAULT_SCHEME",
    "resolve_config",
    "check_config_list",
    "is_calibration_config",
    "config_list_from_bits",
]

ACTIVATION_OP_TYPES = ("ReLU", "ReLU6", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d")
QUANTIZABLE_OP_TYPES = WEIGHTED_OP_TYPES + TWO_INPUT_OP_TYPES + ACTIVATION_OP_TYPES

# Backend-friendly defaults (NNI used per_tensor_affine uint for everything): int8 symmetric
# per-channel weights and uint8 affine activations are what ONNX Runtime and TensorRT run fastest.
DEFAULT_SCHEME = {"input": "per_tensor_affine", "weight": "per_channel_symmetric", "output": "per_tensor_affine"}
DEFAULT_DTYPE = {"input": "uint", "weight": "int", "output": "uint"}
# A MatMul's operands (an attention's Q, K, V and probabilities) default to int8 symmetric (zero point 0): with
# affine uint8 operands OpenVINO 2026.4 ran the BERT-base-sized encoder no faster than with float attention (18.3
# vs 18.3 ms), with symmetric ones in 16.6 ms (benchmarks/results/openvino-profile-amx.md). A probability operand
# (>= 0) then uses 7 of the 8 bits.
TWO_INPUT_DEFAULT = ("per_tensor_symmetric", "int")
# fp8 is symmetric: per-tensor activations, per-channel weights.
FP8_DEFAULT_SCHEME = {
    "input": "per_tensor_symmetric",
    "weight": "per_channel_symmetric",
    "output": "per_tensor_symmetric",
}
DEFAULT_OBSERVER = "minmax"
DEFAULT_CONVENTION = "mixq"

KEYS = (
    "quant_types",
    "quant_bits",
    "op_types",
    "op_names",
    "exclude",
    "quant_scheme",
    "quant_dtype",
    "quant_start_step",
    "observer",
    "quant_convention",
)


def resolve_config(model: nn.Module, config_list: Sequence[Mapping]) -> dict[str, LayerSpec]:
    """Validate ``config_list`` against ``model`` and return ``{module_name: LayerSpec}`` in module order."""
    check_config_list(config_list)
    if has_torch_attention(model):  # names as mixq.prepare_ will see them (in_proj/out_proj as Linear layers)
        model = explicit_attention_(copy.deepcopy(model))
    modules = {name: m for name, m in model.named_modules() if name}
    entries = [_validate_entry(i, entry, modules) for i, entry in enumerate(config_list)]

    chosen: dict[str, int | None] = {}
    for name, module in modules.items():
        for i, entry in enumerate(entries):
            if _matches(entry, name, module):
                chosen[name] = None if entry.get("exclude") else i
    specs = {}
    for name, i in chosen.items():
        if i is not None:
            specs[name] = _layer_spec(i, entries[i], name, modules[name])
    if not specs and any(not e.get("exclude") for e in entries):
        present = sorted({type(m).__name__ for m in modules.values()})
        raise ConfigError(
            f"config_list selects no module of {type(model).__name__} (module types present: {present}); "
            f"quantizable types: {QUANTIZABLE_OP_TYPES}"
        )
    return specs


CALIBRATION_KEYS = ("weight_scale", "tracked_min_input", "tracked_min_output", "tracked_min_weight", "folded_bn")


def is_calibration_config(value) -> bool:
    """Whether ``value`` looks like a calibration config (as ``export_model`` returns): layer entries with
    scales or tracked ranges, or the calibration file's format key."""
    if not isinstance(value, Mapping):
        return False
    if FORMAT_KEY in value:
        return True
    return any(isinstance(e, Mapping) and any(k in e for k in CALIBRATION_KEYS) for e in value.values())


def check_config_list(config_list) -> None:
    """An error naming what was passed when ``config_list`` is not a list (a bare dict, a calibration config) or is
    empty."""
    if is_calibration_config(config_list):
        raise ConfigError(
            "config_list: this is a calibration config (as export_model returns), not a config_list; pass it to "
            "ModelSpeedup(config=...) / mixq build --calibration"
        )
    if isinstance(config_list, Mapping) and config_list:
        keys = list(config_list)
        shown = ", ".join(repr(str(k)) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise ConfigError(
            f"config_list must be a list of dicts (NNI's config_list), got a dict with keys [{shown}]; "
            "wrap it in a list: [{...}]"
        )
    if not isinstance(config_list, Sequence | Mapping) or isinstance(config_list, str | bytes):
        raise ConfigError(f"config_list must be a list of dicts (NNI's config_list), got {type(config_list).__name__}")
    if not config_list:  # would quantize nothing: almost always a config built or loaded wrong, not a choice
        raise ConfigError(
            "config is empty: a config_list needs at least one entry, e.g. [{'quant_types': ['input', 'weight'], "
            "'quant_bits': 8, 'op_types': ['Conv2d', 'Linear']}] (or use a preset: mixq.INT8)"
        )


def _err(i: int, key: str | None, msg: str) -> ConfigError:
    where = f"config_list[{i}]" + (f"[{key!r}]" if key else "")
    return ConfigError(f"{where}: {msg}")


def _validate_entry(i: int, entry, modules: dict[str, nn.Module]) -> dict:
    if not isinstance(entry, Mapping):
        raise _err(i, None, f"each entry must be a dict, got {type(entry).__name__}")
    if is_calibration_config(entry):
        raise _err(
            i,
            None,
            "this is a calibration config (as export_model returns), not a config_list entry; pass it to "
            "ModelSpeedup(config=...) / mixq build --calibration",
        )
    for key in entry:
        if key not in KEYS:
            hint = difflib.get_close_matches(str(key), KEYS, n=1)
            raise _err(i, key, "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {KEYS}"))
    entry = dict(entry)
    if "op_types" not in entry and "op_names" not in entry:
        raise _err(i, None, "needs 'op_types' or 'op_names' to say which modules it applies to")
    exclude = entry.get("exclude", False)
    if not isinstance(exclude, bool):
        raise _err(i, "exclude", f"must be True or False, got {exclude!r}")

    if "op_types" in entry:
        op_types = _str_list(i, "op_types", entry["op_types"])
        expanded = []
        for t in op_types:
            expanded.extend(WEIGHTED_OP_TYPES if t == "default" else [t])
        for t in op_types:
            if t != "default" and not exclude and t not in QUANTIZABLE_OP_TYPES:
                raise _err(i, "op_types", f"{t!r} cannot be quantized; supported: {QUANTIZABLE_OP_TYPES}")
        # A type the model lacks is fine (one config reused across models); an entry matching nothing is not.
        entry["op_types"] = tuple(dict.fromkeys(expanded))
    if "op_names" in entry:
        names = _str_list(i, "op_names", entry["op_names"])
        for n in names:
            if _is_pattern(n):
                if not any(fnmatch.fnmatchcase(m, n) for m in modules):
                    raise _err(i, "op_names", f"the pattern {n!r} matches no module name in the model")
            elif n not in modules:
                hint = difflib.get_close_matches(n, list(modules), n=1)
                raise _err(
                    i,
                    "op_names",
                    f"no module named {n!r} in the model" + (f"; did you mean {hint[0]!r}?" if hint else ""),
                )
        entry["op_names"] = tuple(dict.fromkeys(names))
    matched = [n for n, m in modules.items() if _matches(entry, n, m)]
    # An op_types-only entry may match nothing here (one config reused across models; resolve_config rejects a
    # config that selects nothing at all); an entry naming modules is specific to this model and must match.
    if not matched and "op_names" in entry:
        present = sorted({type(m).__name__ for m in modules.values()})
        patterns = [p for p in entry["op_names"] if _is_pattern(p)]
        missed_matmul = any(
            type(m).__name__ in TWO_INPUT_OP_TYPES and any(fnmatch.fnmatchcase(n, p) for p in patterns)
            for n, m in modules.items()
        )
        hint = "; a wildcard reaches attention matmuls only with 'op_types': ['MatMul']" if missed_matmul else ""
        raise _err(
            i,
            None,
            "matches no module (op_types and op_names must both match when both are given; "
            f"module types present: {present}){hint}",
        )

    if exclude:
        extra = set(entry) - {"op_types", "op_names", "exclude"}
        if extra:
            raise _err(i, sorted(extra)[0], "an 'exclude' entry takes only 'op_types' and 'op_names'")
        return entry

    for key in ("quant_types", "quant_bits"):
        if key not in entry:
            raise _err(i, key, "missing (required unless 'exclude' is True)")
    types = _str_list(i, "quant_types", entry["quant_types"])
    for t in types:
        if t not in QUANT_TYPES:
            raise _err(i, "quant_types", f"unknown quant type {t!r}; expected some of {QUANT_TYPES}")
    if len(set(types)) != len(types):
        raise _err(i, "quant_types", f"lists a type twice: {types}")
    entry["quant_types"] = tuple(types)

    entry["quant_bits"] = _per_type(i, "quant_bits", entry["quant_bits"], types, None, _check_bits)
    entry["input_format_given"] = "quant_dtype" in entry or "quant_scheme" in entry
    entry["quant_dtype"] = _per_type(i, "quant_dtype", entry.get("quant_dtype"), types, DEFAULT_DTYPE, _check_dtype)
    fp8 = [t for t in types if entry["quant_dtype"][t] == FP8_DTYPE]
    default_scheme = {t: (FP8_DEFAULT_SCHEME if t in fp8 else DEFAULT_SCHEME)[t] for t in types}
    entry["quant_scheme"] = _per_type(
        i, "quant_scheme", entry.get("quant_scheme"), types, default_scheme, _check_scheme
    )
    entry["quant_convention"] = _per_type(
        i,
        "quant_convention",
        entry.get("quant_convention"),
        types,
        dict.fromkeys(types, DEFAULT_CONVENTION),
        _check_convention,
    )
    entry["observer"] = _check_observer(i, "observer", entry.get("observer", DEFAULT_OBSERVER))
    for t in types:
        if t != "weight" and SCHEMES[entry["quant_scheme"][t]][0]:
            raise _err(i, "quant_scheme", f"per-channel schemes apply to weights only, not to {t!r}")
    _check_fp8(i, entry, fp8)
    start = entry.get("quant_start_step", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise _err(i, "quant_start_step", f"must be an int >= 0, got {start!r}")
    entry["quant_start_step"] = start

    if "weight" in types:
        for n in matched:
            if not isinstance(getattr(modules[n], "weight", None), nn.Parameter):
                raise _err(
                    i, "quant_types", f"asks for 'weight' but module {n!r} ({type(modules[n]).__name__}) has no weight"
                )
    for n in matched:
        if type(modules[n]).__name__ not in QUANTIZABLE_OP_TYPES:
            raise _err(
                i,
                "op_names",
                f"module {n!r} is a {type(modules[n]).__name__}, which cannot be quantized; "
                f"supported: {QUANTIZABLE_OP_TYPES}",
            )
    return entry


def _str_list(i, key, value) -> list[str]:
    if isinstance(value, str):
        raise _err(i, key, f"must be a list of strings, got the string {value!r} (write [{value!r}])")
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
        raise _err(i, key, f"must be a non-empty list of strings, got {value!r}")
    return list(value)


def _per_type(i, key, value, types, default, check) -> dict:
    """Expand a scalar or per-type dict into ``{quant_type: value}`` for the entry's quant_types."""
    if value is None:
        return {t: default[t] for t in types}
    if isinstance(value, Mapping):
        for t in value:
            if t not in types:
                raise _err(i, key, f"has a value for {t!r}, which is not in quant_types {list(types)}")
        for t in types:
            if t not in value:
                raise _err(i, key, f"has no value for quant type {t!r} listed in quant_types")
        return {t: check(i, key, value[t]) for t in types}
    return {t: check(i, key, value) for t in types}


def _check_bits(i, key, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(i, key, f"bits must be an int, got {v!r}")
    if not MIN_BITS <= v <= MAX_BITS:
        # NNI's QAT accepts 1..31, but what it can export to an engine (TensorRT) is 8, 16 or float (32), and
        # mixq's engines build 2..8-bit weights, 8-bit activations and fp16 layers. Say so before any training.
        if v == 32:
            hint = "; 32 means float: leave the layer out of config_list to keep it float"
        elif MAX_BITS < v < 32:
            hint = (
                f"; NNI's QAT_Quantizer accepts up to 31 bits, but no engine (NNI's TensorRT export or mixq's) "
                f"builds {v}-bit layers: use 16 (fp16) or leave the layer out to keep it float"
            )
        elif v == 1:
            hint = "; 1-bit (binary) layers are BNN's, which no engine builds and mixq does not provide"
        else:
            hint = ""
        raise _err(i, key, f"bits must be in {MIN_BITS}..{MAX_BITS}, got {v}{hint}")
    return v


def _check_scheme(i, key, v):
    if v not in SCHEMES:
        raise _err(i, key, f"unknown scheme {v!r}; expected one of {sorted(SCHEMES)}")
    return v


def _check_dtype(i, key, v):
    if v not in DTYPES:
        raise _err(i, key, f"unknown dtype {v!r}; expected one of {DTYPES}")
    return v


def _check_fp8(i: int, entry: dict, fp8: list[str]) -> None:
    """fp8 (e4m3) types: all of the entry's types or none (no engine builds a layer that mixes integer and fp8
    tensors), 8 bits, a symmetric scheme, mixq's convention, an observer that suits a float grid."""
    mixed = [t for t in entry["quant_types"] if t not in fp8]
    if fp8 and mixed:
        raise _err(
            i,
            "quant_dtype",
            f"{fp8} fp8 but {mixed} integer: a layer is fp8 throughout or not at all (no engine builds a layer that "
            "mixes integer and fp8 tensors); use quant_dtype 'fp8' for every type or for none",
        )
    for t in fp8:
        if entry["quant_bits"][t] != FP8_E4M3.bits:
            raise _err(i, "quant_bits", f"fp8 needs quant_bits {FP8_E4M3.bits}, got {entry['quant_bits'][t]} for {t!r}")
        if not SCHEMES[entry["quant_scheme"][t]][1]:
            raise _err(
                i,
                "quant_scheme",
                f"fp8 is symmetric (zero point 0), got {entry['quant_scheme'][t]!r} for {t!r}; use "
                f"{FP8_DEFAULT_SCHEME[t]!r} (the default for fp8)",
            )
        if entry["quant_convention"][t] != DEFAULT_CONVENTION:
            raise _err(i, "quant_convention", f"NNI's convention is for integer types, not fp8 ({t!r})")
    if fp8 and entry["observer"] == "entropy" and any(t != "weight" for t in fp8):
        raise _err(i, "observer", ENTROPY_FP8_ERROR)


def _check_convention(i, key, v):
    if v not in CONVENTIONS:
        raise _err(i, key, f"unknown convention {v!r}; expected one of {CONVENTIONS}")
    return v


def _check_observer(i, key, v):
    if not isinstance(v, str) or v not in OBSERVERS:
        raise _err(i, key, f"unknown observer {v!r}; expected one of {sorted(OBSERVERS)}")
    return v


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _matches(entry: dict, name: str, module: nn.Module) -> bool:
    if "op_types" in entry and type(module).__name__ not in entry["op_types"]:
        return False
    if "op_names" not in entry or name in entry["op_names"]:
        return True
    # A wildcard (fnmatch: *, ?, [..]) sweeps containers too; it selects only the quantizable modules it meets, and an
    # attention's MatMul only where op_types names it (configs written before MatMul was quantizable keep their
    # meaning, and prepared models their state dict keys).
    if type(module).__name__ not in QUANTIZABLE_OP_TYPES:
        return False
    if type(module).__name__ in TWO_INPUT_OP_TYPES and "op_types" not in entry:
        return False
    return any(_is_pattern(p) and fnmatch.fnmatchcase(name, p) for p in entry["op_names"])


def _layer_spec(i: int, entry: dict, name: str, module: nn.Module) -> LayerSpec:
    specs = {}
    two_inputs = type(module).__name__ in TWO_INPUT_OP_TYPES and not entry["input_format_given"]
    for t in entry["quant_types"]:
        scheme, dtype = entry["quant_scheme"][t], entry["quant_dtype"][t]
        if two_inputs and t == "input" and dtype != FP8_DTYPE:
            scheme, dtype = TWO_INPUT_DEFAULT
        specs[t] = QuantSpec.from_nni(
            entry["quant_bits"][t], scheme, dtype, axis=0, convention=entry["quant_convention"][t]
        )
    return LayerSpec(
        name=name,
        op_type=type(module).__name__,
        quant_start_step=entry["quant_start_step"],
        observer=entry["observer"],
        **specs,
    )


SPEEDUP_BITS = (8, 16, 32)  # what NNI's speedup builds: int8, fp16, float


def config_list_from_bits(model: nn.Module, bits_config: Mapping, observer: str = DEFAULT_OBSERVER) -> list[dict]:
    """The config_list for post-training calibration of NNI's bits-only speedup config
    (``{'conv1': {'weight_bits': 8, 'output_bits': 8}, 'conv2': {'weight_bits': 32, ...}, ...}``).

    As NNI's TensorRT builder does, ``weight_bits`` (or ``output_bits`` when it is the only one) sets the
    layer's precision: 32 leaves it float; at 8 or 16 a conv/linear gets its input and weight quantized, and
    its output when ``output_bits`` equals that precision; a layer without weights (ReLU, pooling) gets its
    output quantized unless ``output_bits`` is 32. Errors name the layer and key."""
    modules = {name: m for name, m in model.named_modules() if name}
    config_list = []
    for name, entry in bits_config.items():
        where = f"bits config: layer {name!r}"
        if name not in modules:
            hint = difflib.get_close_matches(str(name), list(modules), n=1)
            raise ConfigError(f"{where} is not in the model" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        bits = {}
        for key, v in entry.items():
            v = int(v) if _is_whole(v) else v
            if isinstance(v, bool) or v not in SPEEDUP_BITS:
                raise ConfigError(f"{where}: {key} must be one of {SPEEDUP_BITS} (int8, fp16, float), got {v!r}")
            bits[key.removesuffix("_bits")] = v
        precision = bits.get("weight", bits.get("output", bits.get("input")))
        if precision == 32:
            continue
        op_type = type(modules[name]).__name__
        if op_type not in QUANTIZABLE_OP_TYPES:
            raise ConfigError(f"{where} is a {op_type}, which cannot be quantized; supported: {QUANTIZABLE_OP_TYPES}")
        if op_type in WEIGHTED_OP_TYPES:
            types = ["input", "weight"] + (["output"] if bits.get("output") == precision else [])
        elif op_type in TWO_INPUT_OP_TYPES:  # its operands, as a conv's input and weight
            types = ["input"] + (["output"] if bits.get("output") == precision else [])
        elif bits.get("output") == 32:
            continue
        else:
            types = ["output"]
        config_list.append({"quant_types": types, "quant_bits": precision, "op_names": [name], "observer": observer})
    return config_list


def _is_whole(v) -> bool:
    """An int, or a float / one-element tensor holding a whole number (NNI configs may carry either)."""
    try:
        return not isinstance(v, bool) and float(v) == int(v)
    except (TypeError, ValueError, RuntimeError):
        return False
