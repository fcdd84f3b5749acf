"""Frozen descriptions of how one tensor is quantized (dtype, scheme, granularity) and of one layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ._errors import ConfigError

__all__ = ["IntType", "PerTensor", "PerChannel", "QuantSpec", "LayerSpec", "QUANT_TYPES"]

QUANT_TYPES = ("input", "weight", "output")
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class IntType:
    """A signed or unsigned integer type of ``bits`` bits (2..16)."""

    bits: int
    signed: bool

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"IntType.bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"IntType.bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index along ``axis`` (0 = output channels of a Conv/Linear weight)."""

    axis: int = 0


Granularity = PerTensor | PerChannel


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``symmetric``: the zero point is fixed (0 for signed, 2**(bits-1) for unsigned) and the scale is
    ``max(|min|, |max|) / (qmax - zero_point)``. Otherwise affine: ``scale = (max - min) / (qmax - qmin)``
    and the zero point maps ``min`` (after widening the range to contain 0) onto ``qmin``.
    """

    dtype: IntType
    symmetric: bool
    granularity: Granularity = field(default_factory=PerTensor)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.granularity, PerChannel)

    @property
    def axis(self) -> int | None:
        return self.granularity.axis if isinstance(self.granularity, PerChannel) else None

    @property
    def scheme(self) -> str:
        """The NNI name of the scheme, e.g. ``per_channel_symmetric``."""
        return f"{'per_channel' if self.per_channel else 'per_tensor'}_{'symmetric' if self.symmetric else 'affine'}"

    @classmethod
    def from_nni(cls, bits: int, scheme: str, dtype: Literal["int", "uint"], axis: int = 0) -> QuantSpec:
        """Build a spec from NNI's ``quant_bits`` / ``quant_scheme`` / ``quant_dtype`` values."""
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown quant_scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
        if dtype not in ("int", "uint"):
            raise ConfigError(f"unknown quant_dtype {dtype!r}; expected 'int' or 'uint'")
        per_channel, symmetric = SCHEMES[scheme]
        gran = PerChannel(axis) if per_channel else PerTensor()
        return cls(IntType(bits, dtype == "int"), symmetric, gran)

    def to_dict(self) -> dict:
        return {
            "bits": self.dtype.bits,
            "dtype": "int" if self.dtype.signed else "uint",
            "scheme": self.scheme,
            "axis": self.axis,
        }

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls.from_nni(d["bits"], d["scheme"], d["dtype"], d["axis"] if d.get("axis") is not None else 0)


SCHEMES = {
    "per_tensor_affine": (False, False),
    "per_tensor_symmetric": (False, True),
    "per_channel_affine": (True, False),
    "per_channel_symmetric": (True, True),
}


@dataclass(frozen=True)
class LayerSpec:
    """The resolved quantization of one module: a spec per quantized tensor (None = stays float)."""

    name: str
    op_type: str
    input: QuantSpec | None = None
    weight: QuantSpec | None = None
    output: QuantSpec | None = None
    quant_start_step: int = 0
    observer: str = "minmax"

    def spec(self, quant_type: str) -> QuantSpec | None:
        return getattr(self, quant_type)

    @property
    def quant_types(self) -> tuple[str, ...]:
        return tuple(t for t in QUANT_TYPES if self.spec(t) is not None)
