"""Calibration config files: save as ``.json`` or ``.pth`` (atomically), load back identically, validate.

A ``.pth`` file holds the same plain dict (floats, ints, lists, strings) and is read with
``torch.load(weights_only=True)``, so loading never executes a pickle's code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ._errors import CalibrationFileError
from ._io import atomic_write
from .spec import MAX_BITS, MIN_BITS, QUANT_TYPES, QuantSpec

__all__ = ["save_calibration_config", "load_calibration_config", "validate_calibration_config", "FORMAT_KEY"]

FORMAT_KEY = "__mixq_calibration_format__"
FORMAT_VERSION = 1


def save_calibration_config(config: dict, path: str | os.PathLike) -> Path:
    """Write ``config`` to ``path`` (``.json`` or ``.pth``) atomically; validates it first."""
    path = Path(path)
    validate_calibration_config(config, source=str(path))
    payload = {FORMAT_KEY: FORMAT_VERSION, **config}
    if path.suffix == ".json":
        with atomic_write(path, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False)
    elif path.suffix in (".pth", ".pt"):
        with atomic_write(path, "wb") as f:
            torch.save(payload, f)
    else:
        raise CalibrationFileError(f"{path}: calibration files must end in .json or .pth, not {path.suffix!r}")
    return path


def load_calibration_config(path: str | os.PathLike) -> dict:
    """Read a calibration config written by :func:`save_calibration_config` (or an NNI ``.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationFileError(f"{path}: calibration file not found")
    try:
        if path.suffix == ".json":
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
    version = data.pop(FORMAT_KEY, None)
    if version is not None and version != FORMAT_VERSION:
        raise CalibrationFileError(
            f"{path}: calibration format version {version!r}; this mixq reads version {FORMAT_VERSION}"
        )
    data = {k: _to_plain(v) for k, v in data.items()}
    validate_calibration_config(data, source=str(path))
    return data


def _to_plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.dim() == 0 else v.tolist()
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    return v


def validate_calibration_config(config: dict, source: str = "calibration config") -> None:
    """Check types and ranges of every layer entry; errors name the source, the layer and the key."""
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
        if spec is not None and not spec.dtype.qmin <= z <= spec.dtype.qmax:
            raise CalibrationFileError(
                f"{where}: {zk} {z} is outside the {spec.dtype.name} range [{spec.dtype.qmin}, {spec.dtype.qmax}]"
            )
