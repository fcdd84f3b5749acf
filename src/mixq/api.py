"""The native API in two verbs: ``mixq.quantize`` (model + config -> the quantized model, calibrated when a
forward loop is given) and ``mixq.compile`` (quantized model + example input -> an engine called like the
model), with ``mixq.load`` for engine files and typed presets (``mixq.INT8``, ``mixq.FP8``, ``mixq.W4A8``)
that need no model. It sits at the speedup level: ``compile`` is :class:`mixq.speedup.ModelSpeedup`'s
export -> build (-> ``auto`` selection) path, with native argument names; the lower-level verbs
(``prepare_``, ``calibrate_``, ``export_calibration``, ...) stay available.

Importing this module imports no ONNX or backend runtime: ``compile`` and ``load`` import them when called.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ._errors import ConfigError
from .quantization import LSQ, PTQ, QAT, DoReFa, calibrate_, deploy_model, export_calibration, prepare_
from .quantization import quantized_layers as _quantized_layers

if TYPE_CHECKING:
    from .auto import Selection
    from .backends import Engine, LayerPlacement
    from .report import PlacementReport
    from .speedup import ModelSpeedup

__all__ = ["Preset", "INT8", "FP8", "W4A8", "PRESETS", "quantize", "compile", "load", "CompiledModel"]

_METHODS = (QAT, PTQ, LSQ, DoReFa)


@dataclass(frozen=True)
class Preset:
    """A whole-model quantization recipe that needs no model: resolved against the model inside
    :func:`quantize` into a ``config_list`` over every conv/linear input and weight and every ReLU / ReLU6
    output (the coverage of :func:`mixq.speedup.all_int8_config`).

    ``weight_bits``/``activation_bits``: integer bits (ignored for fp8, which is 8-bit e4m3 throughout);
    ``dtype``: ``"int"`` or ``"fp8"``; ``observer``: the PTQ range observer (``minmax``, ``ema``,
    ``percentile``, ``entropy``, ``mse``). Change one with ``dataclasses.replace(mixq.INT8, observer="mse")``.
    Activations below 8 bits (e.g. ``Preset("W4A4", 4, 4)``) train and calibrate but build on no backend
    (engines run 8-bit activations): :func:`compile` says so in one line naming the first layer.
    """

    name: str
    weight_bits: int = 8
    activation_bits: int = 8
    dtype: str = "int"
    observer: str = "minmax"

    def __post_init__(self):
        if self.dtype not in ("int", "fp8"):
            raise ConfigError(f"preset {self.name!r}: dtype must be 'int' or 'fp8', got {self.dtype!r}")
        for key in ("weight_bits", "activation_bits"):
            bits = getattr(self, key)
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ConfigError(f"preset {self.name!r}: {key} must be an int in 2..8 (engines build int8 layers), "
                                  f"got {bits!r}")  # fmt: skip

    def config_list(self, model: nn.Module) -> list[dict]:
        """The ``config_list`` this preset means for ``model``."""
        from .speedup import all_int8_config

        bits = {"weight": self.weight_bits, "input": self.activation_bits, "output": self.activation_bits}
        out = []
        for entry in all_int8_config(model, self.observer):
            entry = {**entry, "quant_bits": {t: bits[t] for t in entry["quant_types"]}}
            if self.dtype == "fp8":
                entry = {**entry, "quant_bits": 8, "quant_dtype": "fp8"}
            out.append(entry)
        return out


INT8 = Preset("INT8")
"""int8 weights (per-channel symmetric) and activations (per-tensor affine uint8): int8 kernels on every backend."""
FP8 = Preset("FP8", dtype="fp8")
"""fp8 (e4m3) weights and activations: fp8 tensor cores in the ``cuda`` backend (compute capability 8.9+) and
TensorRT; the CPU backends emulate it (slower than fp32; docs/fp8-backends.md)."""
W4A8 = Preset("W4A8", weight_bits=4)
"""4-bit weights, 8-bit activations. No backend has int4 kernels: engines store the 4-bit weights in int8 on
their own grid and run them on the int8 kernels, so the engine computes what the 4-bit model computes at
INT8's speed and memory, not faster."""
PRESETS = {p.name: p for p in (INT8, FP8, W4A8)}


def _layer_config(model: nn.Module, config) -> Sequence[Mapping] | Mapping:
    """``config`` as ``prepare_`` takes it: a preset (object or name) resolved against ``model``; a
    ``config_list`` or resolved specs passed on (``prepare_``'s errors name their entries)."""
    if isinstance(config, str):
        preset = PRESETS.get(config.upper())
        if preset is None:
            raise ConfigError(
                f"unknown preset {config!r}; presets: {', '.join(PRESETS)} (mixq.INT8, ...), or pass a config_list"
            )
        config = preset
    if isinstance(config, Preset):
        return config.config_list(model)
    if isinstance(config, list | tuple | Mapping):
        return config
    raise ConfigError(
        f"config must be a preset ({', '.join(f'mixq.{p}' for p in PRESETS)}) or a config_list (a list of dicts), "
        f"got {type(config).__name__}"
    )


def quantize(
    model: nn.Module,
    config,
    forward_loop: Callable[[nn.Module], object] | None = None,
    method=None,
    *,
    example_input: torch.Tensor | np.ndarray | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``config``: a preset (``mixq.INT8``, ``mixq.FP8``, ``mixq.W4A8``, or its name) or an NNI-style
    ``config_list`` (docs/config.md). ``method``: ``mixq.PTQ()`` (default), ``mixq.QAT()``, ``mixq.LSQ()`` or
    ``mixq.DoReFa()``. ``forward_loop(model)`` runs your batches through the model: with PTQ it is the
    calibration (observers collect ranges, then the ranges are frozen and the model computes quantized);
    with QAT it sets the starting ranges, and you train afterwards with your own loop. Without a loop the
    model is returned prepared: calibrate later with :func:`mixq.calibrate_`, or train (QAT, LSQ).
    ``example_input`` (a torch tensor or numpy array): with it, each BatchNorm directly after a configured conv
    is folded into that conv.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    method = PTQ() if method is None else method
    if isinstance(method, type) and issubclass(method, _METHODS):
        raise ConfigError(f"method must be an instance, e.g. mixq.{method.__name__}(), not the class")
    if not isinstance(method, _METHODS):
        raise ConfigError(f"method must be mixq.PTQ(), QAT(), LSQ() or DoReFa(), got {type(method).__name__}")
    if forward_loop is not None and not callable(forward_loop):
        raise ConfigError(
            f"forward_loop must be a function of the model, e.g. lambda m: [m(x) for x, _ in loader], "
            f"got {type(forward_loop).__name__}"
        )
    if example_input is not None:
        example_input = _to_tensor(example_input, "example_input")
    prepare_(model, _layer_config(model, config), method, example_input=example_input)
    if forward_loop is not None:
        calibrate_(model, forward_loop)
    return model


def _to_tensor(x, what: str) -> torch.Tensor:
    """``x`` as a torch tensor: every verb takes a numpy array where it takes a tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _as_batch(x, what: str) -> torch.Tensor:
    """``x`` as a float tensor batch an engine can be built for or calibrated on (one line for anything else)."""
    x = _to_tensor(x, what)
    if not x.is_floating_point():
        raise ConfigError(f"{what} must be floating point (a batch as the model takes it), got {x.dtype}")
    if x.dim() < 2 or any(d < 1 for d in x.shape):
        raise ConfigError(f"{what} must be a batch (batch, ...) with positive sizes, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{what} contains NaN or infinite values")
    return x


def _check_positive_int_or_none(name: str, value) -> None:
    # bool is an int subclass: threads=True is a mistake, not one thread
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive int or None, got {value!r}")


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def _check_example_fits(model: nn.Module, x: torch.Tensor) -> None:
    """Run ``x`` through a float copy of ``model`` (the user's model keeps its state: a PTQ model still
    calibrating would otherwise observe it), so that an input the model cannot take is one clear line
    before any export or build."""
    probe = deploy_model(model) if _quantized_layers(model) else copy.deepcopy(model)
    try:
        with torch.no_grad():
            probe.eval()(x.to(_device_of(probe), torch.float32))
    except Exception as e:  # whatever the model's own code raises for a wrong shape
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"example_input of shape {tuple(x.shape)} does not fit {type(model).__name__} ({type(e).__name__}: {first})"
        ) from e


def _calibration_batches(data, example: torch.Tensor) -> list[torch.Tensor] | None:
    if data is None:
        return None
    batches = [data] if isinstance(data, torch.Tensor | np.ndarray) else list(data)
    out = []
    for i, b in enumerate(batches):
        b = _as_batch(b[0] if isinstance(b, list | tuple) else b, f"calibration_data batch {i}")
        if b.shape[1:] != example.shape[1:]:
            raise ConfigError(
                f"calibration_data batch {i}: expected shape {('batch', *example.shape[1:])} (as example_input), "
                f"got {tuple(b.shape)}"
            )
        out.append(b.detach().float().cpu())
    return out or None


def compile(  # mixq.compile, as torch.compile: shadows the builtin here only
    model: nn.Module,
    example_input,
    backend: str = "auto",
    *,
    max_batch: int | None = None,
    threads: int | None = None,
    calibration_data: Iterable | torch.Tensor | None = None,
    float_glue: str = "fp32",
) -> CompiledModel:
    """Build an engine of ``model`` (quantized with :func:`quantize`, or float) for inputs shaped like
    ``example_input`` (any batch up to ``max_batch``, at least the example's batch and by default equal to it,
    where the backend has a limit) and return it as a :class:`CompiledModel`: ``engine(x)`` runs it.

    ``backend``: ``"auto"`` builds every backend this machine can run, times them at the example's batch and
    keeps the fastest, never a quantized engine slower than the fastest float one (``.selection``, and
    ``.report()``, say what was tried); or a backend name (:func:`mixq.backends.list_backends`).
    ``calibration_data``: input batches (a tensor, or an iterable of tensors or (input, label) pairs) that a
    backend may run at build time for tensors the config leaves float but its kernels need quantized (ONNX
    Runtime, TensorRT: e.g. conv outputs feeding residual adds); without it those stay float.
    ``threads``: intra-op threads, a positive int (ONNX Runtime; default all cores).
    ``float_glue``: ``"fp32"`` or ``"fp16"``, the precision of the ``cuda`` backend's float ops that no layer
    covers (LayerNorm, GELU, attention, residual adds; :class:`mixq.backends.BuildOptions`).

    The arguments and the model are checked before any export or build: an example it cannot take, an
    uncalibrated quantized model, an unknown backend, and a ``max_batch`` or ``threads`` that is not a positive
    int (or a ``max_batch`` below the example's batch) are each one :class:`mixq.MixqError` line.
    """
    from .backends import list_backends
    from .speedup import ModelSpeedup, check_float_glue

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = _as_batch(example_input, "example_input")
    if not isinstance(backend, str) or (backend != "auto" and backend not in list_backends()):
        raise ConfigError(f"unknown backend {backend!r}; available: {['auto', *list_backends()]}")
    _check_positive_int_or_none("max_batch", max_batch)
    _check_positive_int_or_none("threads", threads)
    check_float_glue(float_glue)
    if max_batch is not None and max_batch < x.shape[0]:
        raise ConfigError(
            f"max_batch={max_batch} is smaller than example_input's batch {x.shape[0]}: the engine is built and timed "
            f"at the example's batch, so pass max_batch >= {x.shape[0]} (or leave it None)"
        )
    if _quantized_layers(model):
        export_calibration(model)  # an uncalibrated model: the error names the first layer never observed
    batches = _calibration_batches(calibration_data, x)
    _check_example_fits(model, x)
    speedup = ModelSpeedup(
        model,
        tuple(x.shape),
        batchsize=int(x.shape[0]),
        max_batch=max_batch,
        backend=backend,
        threads=threads,
        calib_data_loader=batches,
        float_glue=float_glue,
    )
    return CompiledModel(speedup.compress().engine, speedup)


def load(path: str | os.PathLike) -> CompiledModel:
    """An engine saved with :meth:`CompiledModel.save` (or any mixq engine file), ready to call."""
    from .backends import load_engine

    return CompiledModel(load_engine(path))


class CompiledModel:
    """A built engine, called like the model: ``engine(x)`` takes a float32 torch tensor or numpy array
    shaped ``(batch, *example_input.shape[1:])`` and returns a CPU float32 torch tensor. ``backend``: the
    backend it runs on; ``selection``: what ``backend="auto"`` tried and kept (None otherwise or when
    loaded); ``engine``: the backend's :class:`mixq.backends.Engine`."""

    def __init__(self, engine: Engine, speedup: ModelSpeedup | None = None):
        self.engine = engine
        self._speedup = speedup  # the build, for report(compare_float=True); None for a loaded engine

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def selection(self) -> Selection | None:
        return None if self._speedup is None else self._speedup.selection

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.engine.input_shape

    def __call__(self, x) -> torch.Tensor:
        return self.engine.run(x)

    def placement(self) -> list[LayerPlacement]:
        """Per layer: the precision asked for and what the backend runs it as."""
        return self.engine.placement()

    def report(self, compare_float: bool = False, batch: int | None = None, runs: int = 20) -> PlacementReport:
        """The placement report (``print`` it); with ``compare_float``, per-layer times beside a float engine
        of the same model on the same backend, at ``batch`` (default: the example's batch), ``runs`` runs."""
        if self._speedup is not None:
            return self._speedup.report(compare_float, batch, runs)
        if compare_float:
            raise ConfigError(
                "report(compare_float=True) needs the model, which a loaded engine does not have: "
                "mixq.compile(model, example_input, backend=...) it again to compare with float"
            )
        from .report import PlacementReport

        glue = getattr(self.engine, "unattributed_qdq", None)
        return PlacementReport(self.engine.backend, self.engine.placement(), glue_qdq=glue() if glue else None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the engine file (atomically: a failed save leaves any previous file as it was). A path that
        cannot be written is one :class:`mixq.backends.EngineError` line naming it and why."""
        return self.engine.save(path)  # Engine.save words an OSError as that EngineError line

    def __repr__(self) -> str:
        shape = ("batch", *self.input_shape[1:])
        return f"CompiledModel(backend={self.backend!r}, input {shape})"
