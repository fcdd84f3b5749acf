"""The search space: which layers are decided together (units), the precisions a unit can take (choices),
and the ``config_list`` an assignment of choices means.

A unit is one Conv/Linear layer with the ReLU that directly follows it (the pair backends fuse and the
placement report times together, :func:`mixq.report.fusion_groups`). A quantized choice gives the layer
quantized inputs and weights and the ReLU a quantized output (NNI's tutorial style), so an int8 unit is
one int8 kernel on every CPU backend; pools and other layers stay float. An fp8 choice is the same with
``quant_dtype: "fp8"`` (e4m3); only backends with fp8 kernels are offered it (:func:`offered_on`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._errors import ConfigError
from ..backends import list_backends, registered_backend
from ..config import QUANTIZABLE_OP_TYPES, WEIGHTED_OP_TYPES

__all__ = [
    "Choice",
    "CHOICES",
    "NOT_EXPRESSIBLE",
    "runs_on",
    "offered_on",
    "FLOAT",
    "Unit",
    "find_units",
    "check_choices",
    "config_list_for",
    "describe",
]

FLOAT = "fp32"


@dataclass(frozen=True)
class Choice:
    """One precision a unit can take: ``precision`` is what engines report for it (placement ``runs_as``);
    ``act_bits``/``weight_bits`` are the config_list bits (None for float); ``dtype`` the config_list
    ``quant_dtype`` (None: the integer default)."""

    name: str
    precision: str
    act_bits: int | None = None
    weight_bits: int | None = None
    dtype: str | None = None


CHOICES = {
    "fp32": Choice("fp32", "fp32"),
    "fp16": Choice("fp16", "fp16", 16, 16),
    "int8": Choice("int8", "int8", 8, 8),
    # 7-bit weights on the int8 grid: ONNX Runtime's fast u8 x s8 kernels stay exact on CPUs without VNNI
    "int8w7": Choice("int8w7", "int8", 8, 7),
    "fp8": Choice("fp8", "fp8", 8, 8, "fp8"),  # e4m3, per-tensor inputs, per-channel weights
}

# Named precisions that no config_list can ask for yet, with the reason the search reports (none today).
NOT_EXPRESSIBLE: dict[str, str] = {}

# Choices only some backends run as asked, and why the others are not offered them: a backend that builds a
# precision emulated (its ``emulated``: the rounding emulated around fp32 kernels, e.g. fp8 on the CPU backends,
# exact on ONNX Runtime) runs it slower than fp32 (benchmarks/results/fp8-cpu-backends.md): the search would
# only learn that by building and profiling.
_WHY_NOT = (
    "no {choice} kernels on {backends}: {choice} layers run as fp32 there with {choice} rounding emulated, slower "
    "than fp32 (benchmarks/results/fp8-cpu-backends.md); {choice} is searched on {elsewhere}"
)


def offered_on(choice: str, backend: str) -> bool:
    """Whether the search offers ``choice`` on ``backend``: not where the backend builds its precision emulated
    (``Backend.emulated``). A name no backend is registered under (a measurer's own) is offered every choice."""
    registered = registered_backend(backend)
    return registered is None or CHOICES[choice].precision not in registered.emulated


def runs_on(choice: str) -> tuple[str, ...]:
    """The registered backends the search offers ``choice`` on (:func:`offered_on`)."""
    return tuple(b for b in list_backends() if offered_on(choice, b))


@dataclass(frozen=True)
class Unit:
    """A Conv/Linear layer (``name``) and the activation layers decided with it (``members``)."""

    name: str
    op_type: str
    members: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.name, *self.members)


def find_units(model: nn.Module, example: torch.Tensor) -> list[Unit]:
    """The units of ``model`` in execution order (one forward of ``example``)."""
    from ..report import fusion_groups

    layers = {
        n: {"op_type": type(m).__name__}
        for n, m in model.named_modules()
        if n and type(m).__name__ in QUANTIZABLE_OP_TYPES
    }
    units = [
        Unit(leader, layers[leader]["op_type"], tuple(m for m in members if m != leader))
        for leader, members in fusion_groups(model, layers, example).items()
        if layers[leader]["op_type"] in WEIGHTED_OP_TYPES
    ]
    if not units:
        raise ConfigError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer, so there is nothing to search over"
        )
    return units


def check_choices(
    choices: Sequence[str], backends: Sequence[str] | None = None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the expressible choices, fp32 first, ``{choice: why it is left out}``); an unknown name is an error.
    With ``backends``, a choice none of them is offered (:func:`offered_on`) is left out too."""
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise ConfigError(f"choices must be a non-empty list of precision names, got {choices!r}")
    known = (*CHOICES, *NOT_EXPRESSIBLE)
    for c in choices:
        if c not in known:
            raise ConfigError(f"choices: unknown precision {c!r}; known: {list(known)}")
    left_out = {c: NOT_EXPRESSIBLE[c] for c in choices if c in NOT_EXPRESSIBLE}
    for c in choices:
        if backends is not None and c in CHOICES and not any(offered_on(c, b) for b in backends):
            where = runs_on(c)
            elsewhere = " and ".join([", ".join(where[:-1]), where[-1]] if len(where) > 1 else where) or "no backend"
            left_out[c] = _WHY_NOT.format(choice=c, backends=", ".join(backends), elsewhere=elsewhere)
    kept = tuple(dict.fromkeys([FLOAT, *(c for c in choices if c in CHOICES and c not in left_out)]))
    return kept, left_out


def config_list_for(units: Sequence[Unit], assignment: Mapping[str, str]) -> list[dict]:
    """The config_list that gives each unit its choice (``{unit name: choice}``; absent or fp32 = float):
    per quantized choice one entry for the layers' inputs and weights and one for the activations' outputs."""
    out = []
    for name, choice in CHOICES.items():
        if choice.act_bits is None:
            continue
        chosen = [u for u in units if assignment.get(u.name) == name]
        if not chosen:
            continue
        bits = {"input": choice.act_bits, "weight": choice.weight_bits}
        names = [u.name for u in chosen]
        out.append({"quant_types": ["input", "weight"], "quant_bits": bits, **_dtype(choice, "input", "weight")})
        out[-1]["op_names"] = names
        members = [m for u in chosen for m in u.members]
        if members:
            out.append({"quant_types": ["output"], "quant_bits": choice.act_bits, **_dtype(choice, "output")})
            out[-1]["op_names"] = members
    return out


def _dtype(choice: Choice, *types: str) -> dict:
    """The config_list keys of a non-integer choice: its ``quant_dtype`` and, spelled out so that every face
    reads it alike (NNI's default scheme is affine), the symmetric schemes fp8 takes."""
    if not choice.dtype:
        return {}
    schemes = {"input": "per_tensor_symmetric", "weight": "per_channel_symmetric", "output": "per_tensor_symmetric"}
    return {"quant_dtype": choice.dtype, "quant_scheme": {t: schemes[t] for t in types}}


def describe(units: Sequence[Unit], assignment: Mapping[str, str]) -> str:
    """``int8: 4/5; fp32: conv1``, ``int8: conv2, fc2; fp32: conv1, fc3``, or ``all fp32`` / ``all int8``:
    quantized choices first (as a count when they cover most layers), the float layers by name."""
    picks = [assignment.get(u.name, FLOAT) for u in units]
    kinds = sorted(set(picks), key=lambda k: (k == FLOAT, picks.index(k)))
    if len(kinds) == 1:
        return f"all {kinds[0]}"
    parts = []
    for k in kinds:
        names = [u.name for u, p in zip(units, picks, strict=True) if p == k]
        many = k != FLOAT and len(names) * 2 > len(units)
        parts.append(f"{k}: {len(names)}/{len(units)}" if many else f"{k}: {', '.join(names)}")
    return "; ".join(parts)
