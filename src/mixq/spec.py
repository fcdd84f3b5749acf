"""Frozen descriptions of how one tensor is quantized (dtype, scheme, granularity) and of one layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ._errors import ConfigError

__all__ = ["IntType", "PerTensor", "PerChannel", "QuantSpec", "LayerSpec", "QUANT_TYPES", "CONVENTIONS"]

QUANT_TYPES = ("input", "weight", "output")
MIN_BITS, MAX_BITS = 2, 16
# How integers, zero points and symmetric scales are chosen: mixq's (full signed range, 2**(bits-1) for an
# unsigned symmetric zero point) or NNI 2.x's (see QuantSpec).
CONVENTIONS = ("mixq", "nni")


@dataclass(frozen=True)
class IntType:
    """A signed or unsigned integer type of ``bits`` bits (2..16).

    ``narrow``: a signed type without its most negative value (``qmin = -qmax``, e.g. -127..127), the int
    range of NNI 2.x's quantizers. Engines store it in the full container type.
    """

    bits: int
    signed: bool
    narrow: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"IntType.bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"IntType.bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.narrow and not self.signed:
            raise ConfigError("IntType.narrow applies to signed types only")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(1 << (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

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

    ``convention="nni"`` reproduces NNI 2.x's QAT_Quantizer exactly: signed types are narrow (qmin = -qmax),
    a symmetric zero point is ``(qmin + qmax) // 2`` (127 for uint8, where mixq uses 128) and a symmetric
    scale is ``max(|min|, |max|) / ((qmax - qmin) / 2)``. Build such specs with ``from_nni(..., convention="nni")``.
    """

    dtype: IntType
    symmetric: bool
    granularity: Granularity = field(default_factory=PerTensor)
    convention: str = "mixq"

    def __post_init__(self):
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown quantization convention {self.convention!r}; expected one of {CONVENTIONS}")
        if self.convention == "nni" and self.dtype.signed and not self.dtype.narrow:
            raise ConfigError(
                "NNI's convention uses narrow signed types (qmin = -qmax): IntType(bits, True, narrow=True)"
            )

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
    def from_nni(
        cls, bits: int, scheme: str, dtype: Literal["int", "uint"], axis: int = 0, convention: str = "mixq"
    ) -> QuantSpec:
        """Build a spec from NNI's ``quant_bits`` / ``quant_scheme`` / ``quant_dtype`` values (with
        ``convention="nni"``: NNI's integer range, zero point and scale rules as well)."""
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown quant_scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
        if dtype not in ("int", "uint"):
            raise ConfigError(f"unknown quant_dtype {dtype!r}; expected 'int' or 'uint'")
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown quantization convention {convention!r}; expected one of {CONVENTIONS}")
        per_channel, symmetric = SCHEMES[scheme]
        gran = PerChannel(axis) if per_channel else PerTensor()
        signed = dtype == "int"
        return cls(IntType(bits, signed, narrow=signed and convention == "nni"), symmetric, gran, convention)

    def to_dict(self) -> dict:
        d = {
            "bits": self.dtype.bits,
            "dtype": "int" if self.dtype.signed else "uint",
            "scheme": self.scheme,
            "axis": self.axis,
        }
        if self.convention != "mixq":  # mixq's own files stay as they were
            d["convention"] = self.convention
        if self.dtype.narrow and self.convention == "mixq":
            d["narrow"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        spec = cls.from_nni(
            d["bits"],
            d["scheme"],
            d["dtype"],
            d["axis"] if d.get("axis") is not None else 0,
            d.get("convention", "mixq"),
        )
        if d.get("narrow") and not spec.dtype.narrow:
            spec = dataclasses.replace(spec, dtype=dataclasses.replace(spec.dtype, narrow=True))
        return spec


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
