"""NNI's ``set_quant_scheme_dtype``: the default scheme and dtype per quant type for ``QAT_Quantizer``.

NNI keeps these as process-wide defaults, and so does this module (the one global setting in mixq, because
NNI's API is a global function). A quantizer reads them once, when it is constructed. A quant type whose
scheme or dtype is set here (or in its config_list entry) is quantized exactly as NNI 2.x does it (NNI's
defaults for whatever is left unset, NNI's integer conventions); types left alone keep mixq's defaults.
"""

from __future__ import annotations

from .._errors import ConfigError
from ..spec import QUANT_TYPES, SCHEMES

__all__ = [
    "set_quant_scheme_dtype",
    "reset_quant_scheme_dtype",
    "quant_settings",
    "NNI_DEFAULT_SCHEME",
    "NNI_DEFAULT_DTYPE",
]

# NNI 2.x's defaults (``quant_default_settings``) for a type whose scheme or dtype is given only in part.
NNI_DEFAULT_SCHEME = "per_tensor_affine"
NNI_DEFAULT_DTYPE = "uint"

_settings: dict[str, dict[str, str | None]] = {t: {"quant_scheme": None, "quant_dtype": None} for t in QUANT_TYPES}


def set_quant_scheme_dtype(quant_type: str, new_scheme: str | None = None, new_dtype: str | None = None) -> None:
    """Set the scheme and/or dtype of every later ``QAT_Quantizer``'s ``quant_type`` tensors (NNI's signature;
    None leaves that part unchanged). Accepts NNI's string enums too."""
    quant_type, new_scheme, new_dtype = (_str(v) for v in (quant_type, new_scheme, new_dtype))
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"set_quant_scheme_dtype: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if new_scheme is not None and new_scheme not in SCHEMES:
        raise ConfigError(f"set_quant_scheme_dtype: unknown scheme {new_scheme!r}; expected one of {sorted(SCHEMES)}")
    if new_dtype is not None and new_dtype not in ("int", "uint"):
        raise ConfigError(f"set_quant_scheme_dtype: unknown dtype {new_dtype!r}; expected 'int' or 'uint'")
    if new_scheme is not None:
        _settings[quant_type]["quant_scheme"] = new_scheme
    if new_dtype is not None:
        _settings[quant_type]["quant_dtype"] = new_dtype


def reset_quant_scheme_dtype() -> None:
    """Forget every ``set_quant_scheme_dtype`` call: all types back to mixq's defaults."""
    for t in QUANT_TYPES:
        _settings[t] = {"quant_scheme": None, "quant_dtype": None}


def quant_settings() -> dict[str, dict[str, str | None]]:
    """A copy of the current settings: ``{quant_type: {"quant_scheme": ..., "quant_dtype": ...}}`` (None: unset)."""
    return {t: dict(v) for t, v in _settings.items()}


def _str(v):
    """NNI's enums are ``str`` subclasses; take their value."""
    return getattr(v, "value", v) if v is not None else None


def nni_config_list(config_list):
    """``config_list`` with NNI's scheme/dtype rules spelled out for mixq's resolver.

    For each quant type of an entry whose ``quant_scheme`` or ``quant_dtype`` is given (in the entry or by
    :func:`set_quant_scheme_dtype`), the other one defaults as in NNI (per_tensor_affine, uint) and
    ``quant_convention`` becomes ``'nni'``; other types get mixq's defaults. Entries this cannot read (not a
    dict, odd keys or values) are passed on unchanged so that the resolver's error names them."""
    if not isinstance(config_list, list | tuple):
        return config_list
    return [_nni_entry(e) for e in config_list]


def _nni_entry(entry):
    from ..config import DEFAULT_DTYPE, DEFAULT_SCHEME, FP8_DEFAULT_SCHEME
    from ..spec import FP8_DTYPE

    if not isinstance(entry, dict) or entry.get("exclude") or "quant_convention" in entry:
        return entry
    types = entry.get("quant_types")
    if not isinstance(types, list | tuple) or not all(t in QUANT_TYPES for t in types):
        return entry
    given = {}
    for key in ("quant_scheme", "quant_dtype"):
        value = entry.get(key)
        if isinstance(value, dict):
            if not set(value) <= set(types):
                return entry
            given[key] = {t: _str(value.get(t)) for t in types}
        else:
            given[key] = dict.fromkeys(types, _str(value))
    if not any(given[k][t] or _settings[t][k] for t in types for k in ("quant_scheme", "quant_dtype")):
        return entry  # nothing set: mixq's defaults, chosen per module (a MatMul's operands differ from a Linear's)
    scheme, dtype, convention = {}, {}, {}
    for t in types:
        s = given["quant_scheme"][t] or _settings[t]["quant_scheme"]
        d = given["quant_dtype"][t] or _settings[t]["quant_dtype"]
        if d == FP8_DTYPE:  # mixq's own dtype: mixq's symmetric defaults, not NNI's integer rules
            scheme[t], dtype[t], convention[t] = s or FP8_DEFAULT_SCHEME[t], d, "mixq"
            continue
        nni = s is not None or d is not None
        scheme[t] = s or (NNI_DEFAULT_SCHEME if nni else DEFAULT_SCHEME[t])
        dtype[t] = d or (NNI_DEFAULT_DTYPE if nni else DEFAULT_DTYPE[t])
        convention[t] = "nni" if nni else "mixq"
    return {**entry, "quant_scheme": scheme, "quant_dtype": dtype, "quant_convention": convention}
