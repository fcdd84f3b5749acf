"""Frozen descriptions of how one tensor is quantized (dtype, scheme, granularity) and of one layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ._errors import ConfigError

__all__ = [
    "IntType",
    "FloatType",
    "FP8_E4M3",
    "PerTensor",
    "PerChannel",
    "QuantSpec",
    "LayerSpec",
    "QUANT_TYPES",
    "TWO_INPUT_OP_TYPES",
    "SECOND_INPUT",
    "CONVENTIONS",
    "FORMAT_KEY",
]

QUANT_TYPES = ("input", "weight", "output")
# The torch module types whose weight is quantized (layer records name them by op_type; backends read it).
WEIGHTED_OP_TYPES = ("Conv1d", "Conv2d", "Linear")
# Modules with two activation inputs (``mixq.attention.MatMul``: an attention's Q.K^T and P.V). Their "input"
# quant type quantizes both operands, each with its own range; calibration entries keep the second operand's
# as ``SECOND_INPUT`` keys (``input1_scale``, ``input1_zero_point``, ``tracked_min_input1``, ...), bits and qspec
# shared with ``input``.
TWO_INPUT_OP_TYPES = ("MatMul",)
SECOND_INPUT = "input1"
MIN_BITS, MAX_BITS = 2, 16
# How integers, zero points and symmetric scales are chosen: mixq's (full signed range, 2**(bits-1) for an
# unsigned symmetric zero point) or NNI 2.x's (see QuantSpec).
CONVENTIONS = ("mixq", "nni")
# The key that marks a mapping as a mixq calibration file (its value: the format version). Here, below both
# config (which recognizes a calibration config passed where a config_list belongs) and calibration (which
# writes and reads the files).
FORMAT_KEY = "__mixq_calibration_format__"


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
class FloatType:
    """An 8-bit float type: OCP float8 e4m3fn (4 exponent bits, 3 mantissa bits, no infinities, largest finite
    value 448; ``torch.float8_e4m3fn``, ONNX ``FLOAT8E4M3FN``), the one float type mixq quantizes to.

    Quantizing to it (see :mod:`mixq.primitives`): ``x / scale`` saturated to ``[-max, max]`` and rounded to the
    nearest e4m3 value (ties to even); the zero point is always 0.
    """

    bits: int = 8
    name: str = "fp8_e4m3"
    max: float = 448.0

    def __post_init__(self):
        if (self.bits, self.name, self.max) != (8, "fp8_e4m3", 448.0):
            raise ConfigError(
                f"FloatType: only fp8_e4m3 (8 bits, max 448) is supported, got {self.name!r} with {self.bits} bits, "
                f"max {self.max}"
            )

    @property
    def signed(self) -> bool:
        return True


FP8_E4M3 = FloatType()
"""The one float type mixq quantizes to, OCP float8 e4m3fn (largest finite value 448); configs and calibration
files call it ``"fp8"`` (``FP8_DTYPE``)."""
FP8_DTYPE = "fp8"  # the quant_dtype / calibration-file name of FP8_E4M3
DTYPES = ("int", "uint", FP8_DTYPE)


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

    A :class:`FloatType` (fp8) spec is symmetric with zero point 0 and ``scale = max(|min|, |max|) / 448``, in
    mixq's convention only.
    """

    dtype: IntType | FloatType
    symmetric: bool
    granularity: Granularity = field(default_factory=PerTensor)
    convention: str = "mixq"

    def __post_init__(self):
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown quantization convention {self.convention!r}; expected one of {CONVENTIONS}")
        if self.is_float:
            if not self.symmetric:
                raise ConfigError(f"fp8 quantization is symmetric (zero point 0); got scheme {self.scheme!r}")
            if self.convention != "mixq":
                raise ConfigError("NNI's quantization convention is for integer types; fp8 uses mixq's")
            return
        if self.convention == "nni" and self.dtype.signed and not self.dtype.narrow:
            raise ConfigError(
                "NNI's convention uses narrow signed types (qmin = -qmax): IntType(bits, True, narrow=True)"
            )

    @property
    def is_float(self) -> bool:
        """Whether the tensor is quantized to fp8 (a :class:`FloatType`) rather than to integers."""
        return isinstance(self.dtype, FloatType)

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
        cls, bits: int, scheme: str, dtype: Literal["int", "uint", "fp8"], axis: int = 0, convention: str = "mixq"
    ) -> QuantSpec:
        """Build a spec from NNI's ``quant_bits`` / ``quant_scheme`` / ``quant_dtype`` values (with
        ``convention="nni"``: NNI's integer range, zero point and scale rules as well; ``dtype="fp8"``: e4m3)."""
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown quant_scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
        if dtype not in DTYPES:
            raise ConfigError(f"unknown quant_dtype {dtype!r}; expected one of {DTYPES}")
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown quantization convention {convention!r}; expected one of {CONVENTIONS}")
        per_channel, symmetric = SCHEMES[scheme]
        gran = PerChannel(axis) if per_channel else PerTensor()
        if dtype == FP8_DTYPE:
            if bits != FP8_E4M3.bits:
                raise ConfigError(f"fp8 needs {FP8_E4M3.bits} bits, got {bits!r}")
            return cls(FP8_E4M3, symmetric, gran, convention)
        signed = dtype == "int"
        return cls(IntType(bits, signed, narrow=signed and convention == "nni"), symmetric, gran, convention)

    def to_dict(self) -> dict:
        d = {
            "bits": self.dtype.bits,
            "dtype": FP8_DTYPE if self.is_float else "int" if self.dtype.signed else "uint",
            "scheme": self.scheme,
            "axis": self.axis,
        }
        if self.is_float:
            return d
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
        if d.get("narrow") and not spec.is_float and not spec.dtype.narrow:
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
