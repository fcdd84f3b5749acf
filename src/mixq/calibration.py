"""Calibration config files: save as ``.json`` or ``.pth`` (atomically), load back identically, validate.

A ``.pth`` file holds the same plain dict (floats, ints, lists, strings) and is read with
``torch.load(weights_only=True)``, so loading never executes a pickle's code.

:func:`normalize_calibration_config` is the one door for a config in memory: what ``export_model`` returns,
that dict reloaded with ``torch.load`` (file format key included) and NNI-made dicts (tensor values, float
zero points, per-channel tensors shaped ``[C, 1, 1, 1]``, 32 bits meaning float) all become the same plain dict.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ._errors import CalibrationFileError
from ._io import atomic_write
from .primitives import SCALE_EPS
from .spec import (
    FORMAT_KEY,
    FP8_DTYPE,
    FP8_E4M3,
    MAX_BITS,
    MIN_BITS,
    QUANT_TYPES,
    SECOND_INPUT,
    TWO_INPUT_OP_TYPES,
    QuantSpec,
)

__all__ = [
    "save_calibration_config",
    "load_calibration_config",
    "validate_calibration_config",
    "normalize_calibration_config",
    "is_bits_config",
    "save_calibration_cache",
    "load_calibration_cache",
    "FORMAT_KEY",
    "BITS_KEYS",
]

FORMAT_VERSION = 1
CACHE_KEY = "__mixq_cache_key__"  # what a calibration cache was made from (model, layers, calibrator)
BITS_KEYS = tuple(f"{t}_bits" for t in QUANT_TYPES)
FLOAT_BITS = 32  # NNI: a type at 32 bits stays float
# Every key of one quantized type in an entry (NNI's and mixq's).
_TYPE_KEYS = {
    t: (f"{t}_bits", f"{t}_scale", f"{t}_zero_point", f"{t}_qspec", f"tracked_min_{t}", f"tracked_max_{t}")
    for t in QUANT_TYPES
}
# A MatMul's second operand (mixq.spec.SECOND_INPUT): its own range and qparams, the input's bits and qspec.
_TYPE_KEYS["input"] += tuple(f"{k}_{SECOND_INPUT}" for k in ("tracked_min", "tracked_max")) + tuple(
    f"{SECOND_INPUT}_{k}" for k in ("scale", "zero_point")
)


def save_calibration_config(config: dict, path: str | os.PathLike) -> Path:
    """Write ``config`` to ``path`` (``.json`` or ``.pth``) atomically; validates it first."""
    path = Path(path)
    config = normalize_calibration_config(config, source=str(path))
    if path.suffix not in (".json", ".pth", ".pt"):
        raise CalibrationFileError(f"{path}: calibration files must end in .json or .pth, not {path.suffix!r}")
    _write({FORMAT_KEY: FORMAT_VERSION, **config}, path, as_json=path.suffix == ".json")
    return path


def _write(payload: dict, path: Path, as_json: bool) -> None:
    if as_json:
        with atomic_write(path, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False)
    else:
        with atomic_write(path, "wb") as f:
            torch.save(payload, f)


def load_calibration_config(path: str | os.PathLike) -> dict:
    """Read a calibration config written by :func:`save_calibration_config` (or an NNI ``.pth``)."""
    path = Path(path)
    data = _read(path, as_json=path.suffix == ".json")
    data.pop(CACHE_KEY, None)
    return normalize_calibration_config(data, source=str(path))


def _read(path: Path, as_json: bool) -> dict:
    if not path.is_file():
        raise CalibrationFileError(f"{path}: calibration file not found")
    try:
        if as_json:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationFileError(f"{path}: not valid JSON ({e})") from e
    except Exception as e:  # torch.load raises many types for corrupt or unsafe files
        raise CalibrationFileError(f"{path}: cannot read as a calibration file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CalibrationFileError(f"{path}: expected a dict of layers, found {type(data).__name__}")
    return data


def save_calibration_cache(config: dict, path: str | os.PathLike, key: str) -> Path:
    """Write a calibration cache (JSON whatever the suffix, e.g. NNI's ``calibration.cache``) that remembers
    ``key``, a digest of what the calibration was made from."""
    path = Path(path)
    config = normalize_calibration_config(config, source=str(path))
    _write({FORMAT_KEY: FORMAT_VERSION, CACHE_KEY: key, **config}, path, as_json=True)
    return path


def load_calibration_cache(path: str | os.PathLike, key: str) -> dict | None:
    """The cached calibration at ``path`` if it was made with ``key``; None (with a warning saying why, when
    a file is there) if it is missing, another model's or calibrator's, or not a mixq cache (e.g. TensorRT's)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = _read(path, as_json=True)
    except CalibrationFileError as e:
        warnings.warn(
            f"{e}; not a mixq calibration cache (a TensorRT one?): calibrating again and replacing it", stacklevel=3
        )
        return None
    if data.pop(CACHE_KEY, None) != key:
        warnings.warn(
            f"{path}: this calibration cache was made for another model, layer config or calibrate_type; "
            "calibrating again and replacing it",
            stacklevel=3,
        )
        return None
    return normalize_calibration_config(data, source=str(path))


def is_bits_config(config) -> bool:
    """Whether ``config`` is NNI's bits-only speedup config (``{'conv1': {'weight_bits': 8, 'output_bits': 8},
    ...}``): a non-empty dict of layers giving only ``*_bits``, with no scales or ranges to build from."""
    if not isinstance(config, Mapping) or not config or FORMAT_KEY in config:
        return False
    return all(isinstance(e, Mapping) and e and all(k in BITS_KEYS for k in e) for e in config.values())


def normalize_calibration_config(config, source: str = "calibration config") -> dict:
    """``config`` as mixq's plain, validated calibration dict (a new dict; the caller's is not changed).

    Accepts mixq's own dict or file contents (the format key is checked and dropped) and NNI-made dicts:
    tensors (on any device) become numbers or flat lists, zero points and bits given as whole floats become
    ints, and a type at 32 bits is dropped (NNI: that tensor stays float), as is a layer left with none.
    """
    if not isinstance(config, Mapping):
        raise CalibrationFileError(f"{source}: expected a dict of layers, found {type(config).__name__}")
    data = dict(config)
    version = data.pop(FORMAT_KEY, None)
    if version is not None and version != FORMAT_VERSION:
        raise CalibrationFileError(
            f"{source}: calibration format version {version!r}; this mixq reads version {FORMAT_VERSION}"
        )
    out = {}
    for layer, entry in data.items():
        if not isinstance(entry, Mapping):
            raise CalibrationFileError(f"{source}: layer {layer!r}: expected a dict, found {type(entry).__name__}")
        e = {k: _plain(v) for k, v in entry.items()}
        if f"{SECOND_INPUT}_zero_point" in e:
            e[f"{SECOND_INPUT}_zero_point"] = _whole(e[f"{SECOND_INPUT}_zero_point"])
        for t in QUANT_TYPES:
            for k in (f"{t}_bits", f"{t}_zero_point"):
                if k in e:
                    e[k] = _whole(e[k])
            if e.get(f"{t}_bits") == FLOAT_BITS:
                for k in _TYPE_KEYS[t]:
                    e.pop(k, None)
        _scale_from_weight_range(e)
        if any(k in e for k in BITS_KEYS):
            out[str(layer)] = e
    validate_calibration_config(out, source=source)
    return out


def _scale_from_weight_range(e: dict) -> None:
    """NNI's ObserverQuantizer records a weight as a symmetric range (``tracked_min_weight``/``tracked_max_weight``
    over ``tracked_qmin_weight``..``tracked_qmax_weight``) instead of a scale: its scale is ``max / qmax``."""
    lo, hi = e.get("tracked_min_weight"), e.get("tracked_max_weight")
    if "weight_bits" not in e or "weight_scale" in e or not all(_is_number(v) for v in (lo, hi)):
        return
    bits = e["weight_bits"]
    qmax = e.get("tracked_qmax_weight", (1 << (bits - 1)) - 1 if isinstance(bits, int) else None)
    if isinstance(e.get("weight_qspec"), Mapping) and e["weight_qspec"].get("dtype") == FP8_DTYPE:
        qmax = FP8_E4M3.max
    if _is_number(qmax) and qmax > 0:
        e["weight_scale"] = max(max(abs(lo), abs(hi)) / qmax, SCALE_EPS)
        e["weight_zero_point"] = 0


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def _plain(v):
    """Tensors as Python numbers (one element) or flat lists; dicts recursively; anything else unchanged."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.reshape(-1).tolist()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _whole(v):
    """Floats that are whole numbers (NNI stores zero points as float tensors) as ints; else unchanged."""
    if isinstance(v, list):
        return [_whole(x) for x in v]
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    return v


def validate_calibration_config(config: dict, source: str = "calibration config") -> None:
    """Check types and ranges of every layer entry of a plain config (see :func:`normalize_calibration_config`);
    errors name the source, the layer and the key."""
    if not isinstance(config, dict):
        raise CalibrationFileError(f"{source}: expected a dict of layers, found {type(config).__name__}")
    for layer, entry in config.items():
        where = f"{source}: layer {layer!r}"
        if not isinstance(entry, dict):
            raise CalibrationFileError(f"{where}: expected a dict, found {type(entry).__name__}")
        for t in QUANT_TYPES:
            if f"{t}_bits" not in entry:
                continue
            bits = entry[f"{t}_bits"]
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise CalibrationFileError(f"{where}: {t}_bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
            spec = _spec_of(entry, t, where)
            if t == "weight":
                _check_qparams(entry, t, spec, where, require=True)
            else:
                lo, hi = entry.get(f"tracked_min_{t}"), entry.get(f"tracked_max_{t}")
                for k, v in ((f"tracked_min_{t}", lo), (f"tracked_max_{t}", hi)):
                    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                        raise CalibrationFileError(f"{where}: {k} must be a finite number, got {v!r}")
                if lo > hi:
                    raise CalibrationFileError(f"{where}: tracked_min_{t} ({lo}) > tracked_max_{t} ({hi})")
                _check_qparams(entry, t, spec, where, require=False)
        _check_second_input(entry, where)


def _check_second_input(entry: dict, where: str) -> None:
    """A MatMul's entry: its second operand's range (and qparams, when given) beside the input's."""
    keys = [k for k in entry if SECOND_INPUT in k]
    op_type = entry.get("op_type")
    if keys and op_type is not None and op_type not in TWO_INPUT_OP_TYPES:
        raise CalibrationFileError(f"{where}: {keys[0]} belongs to a MatMul entry, not a {op_type}")
    if (op_type not in TWO_INPUT_OP_TYPES and not keys) or "input_bits" not in entry:
        return
    t = SECOND_INPUT
    for k in (f"tracked_min_{t}", f"tracked_max_{t}"):
        v = entry.get(k)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise CalibrationFileError(f"{where}: a MatMul quantizes both operands; {k} must be a number, got {v!r}")
    if entry[f"tracked_min_{t}"] > entry[f"tracked_max_{t}"]:
        raise CalibrationFileError(f"{where}: tracked_min_{t} > tracked_max_{t}")
    spec = _spec_of(entry, "input", where)
    _check_qparams(entry, t, spec, where, require=False)


def _spec_of(entry: dict, t: str, where: str) -> QuantSpec | None:
    d = entry.get(f"{t}_qspec")
    if d is None:
        return None
    try:
        spec = QuantSpec.from_dict(d)
    except Exception as e:
        raise CalibrationFileError(f"{where}: {t}_qspec is invalid ({e})") from e
    if spec.dtype.bits != entry[f"{t}_bits"]:
        raise CalibrationFileError(
            f"{where}: {t}_bits {entry[f'{t}_bits']} disagrees with {t}_qspec bits {spec.dtype.bits}"
        )
    return spec


def _check_qparams(entry: dict, t: str, spec: QuantSpec | None, where: str, require: bool) -> None:
    sk, zk = f"{t}_scale", f"{t}_zero_point"
    if sk not in entry and zk not in entry and not require:
        return
    if sk not in entry or zk not in entry:
        raise CalibrationFileError(f"{where}: needs both {sk} and {zk}")
    scales = entry[sk] if isinstance(entry[sk], list) else [entry[sk]]
    zps = entry[zk] if isinstance(entry[zk], list) else [entry[zk]]
    if len(scales) != len(zps) or not scales:
        raise CalibrationFileError(f"{where}: {sk} has {len(scales)} values but {zk} has {len(zps)}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            raise CalibrationFileError(f"{where}: {sk} must be finite and > 0, got {s!r}")
    for z in zps:
        if isinstance(z, bool) or not isinstance(z, int):
            raise CalibrationFileError(f"{where}: {zk} must be an int, got {z!r}")
        if spec is not None and spec.is_float and z != 0:
            raise CalibrationFileError(f"{where}: {zk} must be 0 for fp8 ({spec.dtype.name}), got {z}")
        if spec is not None and not spec.is_float and not spec.dtype.qmin <= z <= spec.dtype.qmax:
            raise CalibrationFileError(
                f"{where}: {zk} {z} is outside the {spec.dtype.name} range [{spec.dtype.qmin}, {spec.dtype.qmax}]"
            )
