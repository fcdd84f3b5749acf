"""The speedup half of the NNI tutorial: model + calibration config -> a real engine, and a report of what
each layer actually runs as. ``ModelSpeedup`` picks the backend; ``ModelSpeedupTensorRT`` is NNI's name."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._errors import ConfigError
from .backends import BuildOptions, Engine, EngineError, LayerPlacement, LayerTime, get_backend, load_engine
from .backends.tensorrt import TensorRTBackend
from .calibration import load_calibration_config, save_calibration_config
from .onnx_export import export_qdq_onnx
from .prepare import PTQ, calibrate_, export_calibration, prepare_, quantized_layers

__all__ = ["ModelSpeedup", "ModelSpeedupTensorRT", "CalibrateType", "PlacementReport", "all_int8_config"]


class CalibrateType:
    """NNI's calibrator names, mapped onto mixq observers (TensorRT 10 deprecates implicit calibrators, so
    calibration happens in mixq and the engine gets explicit Q/DQ)."""

    LEGACY = "minmax"
    ENTROPY = "entropy"
    ENTROPY2 = "entropy"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


def all_int8_config(observer: str = "minmax") -> list[dict]:
    """The all-8-bit config used for PTQ straight from the backend: every conv/linear input and weight,
    every ReLU output."""
    return [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["default"], "observer": observer},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"], "observer": observer},
    ]


@dataclass
class PlacementReport:
    """Per layer: requested precision, what it runs as, the kernels, unfused Q/DQ nodes, and (with a float
    comparison) its time in both forms, with a warning where int8 is slower."""

    backend: str
    rows: list[LayerPlacement]
    times: dict[str, float] = field(default_factory=dict)
    float_times: dict[str, float] = field(default_factory=dict)
    batch: int | None = None
    glue_qdq: int = 0
    groups: dict[str, list[str]] = field(default_factory=dict)  # timed together: leader -> members

    @property
    def mismatches(self) -> list[LayerPlacement]:
        return [r for r in self.rows if r.mismatch]

    @property
    def slower_than_float(self) -> list[str]:
        return [
            r.layer
            for r in self.rows
            if r.runs_as == "int8"
            and r.layer in self.times
            and r.layer in self.float_times
            and self.times[r.layer] > 1.05 * self.float_times[r.layer]
        ]

    def __str__(self) -> str:
        head = "| layer | op | requested | runs as | kernels | unfused Q/DQ |"
        sep = "|---|---|---|---|---|---|"
        timed = bool(self.times)
        if timed:
            head += " time us | float us |"
            sep += "---|---|"
        lines = [f"placement on {self.backend}" + (f" (times: batch {self.batch})" if timed else ""), head, sep]
        for r in self.rows:
            kernels = "+".join(r.kernels) or "-"
            line = f"| {r.layer} | {r.op_type} | {r.requested} | {r.runs_as} | {kernels} | {r.unfused_qdq} |"
            if timed:
                t, f = self.times.get(r.layer), self.float_times.get(r.layer)
                owner = next((k for k, v in self.groups.items() if r.layer in v and k != r.layer), None)
                if owner is not None:
                    line += f" in {owner} | in {owner} |"
                else:
                    line += f" {t:.1f} |" if t is not None else " - |"
                    line += f" {f:.1f} |" if f is not None else " - |"
            lines.append(line)
        if timed:
            g, fg = self.times.get("(glue)", 0.0), self.float_times.get("(glue)", 0.0)
            lines.append(f"glue outside the layers (Q/DQ, layout, flatten, softmax): {g:.1f} us, float {fg:.1f} us")
            total, ftotal = sum(self.times.values()), sum(self.float_times.values())
            lines.append(f"total kernel time: {total:.1f} us, float engine {ftotal:.1f} us")
        for r in self.mismatches:
            lines.append(f"WARNING: {r.layer} asked for {r.requested} but runs as {r.runs_as}: {r.note}")
        for layer in self.slower_than_float:
            lines.append(
                f"WARNING: {layer} is slower in int8 ({self.times[layer]:.1f} us) than in float "
                f"({self.float_times[layer]:.1f} us) on {self.backend}; consider leaving it out of the config"
            )
        for r in self.rows:
            if r.note and r.requested == "fp16":
                lines.append(f"note: {r.layer}: {r.note}")
        return "\n".join(lines)


class ModelSpeedup:
    """Build a real engine from a model and its calibration config.

    ``model``: a mixq-quantized model (its calibration is used unless ``config`` is given), or the float
    model saved by ``export_model`` plus ``config``. Without a config, ``calib_data_loader`` runs PTQ with
    ``calibrate_type`` (an observer name) and builds an all-int8 engine; ``calibration_cache`` keeps that
    calibration as JSON and reuses it when present. ``batchsize`` is the optimization batch; TensorRT
    engines accept batches up to ``max(batchsize, input_shape[0])`` (or ``max_batch``).
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        config: dict | str | os.PathLike | None = None,
        onnx_path: str | os.PathLike | None = None,
        extra_layer_bits: int = 32,
        strict_datatype: bool = True,
        calibrate_type: str = CalibrateType.MINMAX,
        calib_data_loader: Iterable | None = None,
        calibration_cache: str | os.PathLike | None = None,
        batchsize: int = 1,
        input_names: Sequence[str] = ("actual_input_1",),
        output_names: Sequence[str] = ("output1",),
        backend: str = "onnxruntime",
        threads: int | None = None,
        max_batch: int | None = None,
        keep_pools_float: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if len(input_shape) < 2 or any(int(d) < 1 for d in input_shape):
            raise ConfigError(f"input_shape must be (batch, ...) with positive sizes, got {tuple(input_shape)}")
        if isinstance(batchsize, bool) or not isinstance(batchsize, int) or batchsize < 1:
            raise ConfigError(f"batchsize must be a positive int, got {batchsize!r}")
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.config = load_calibration_config(config) if isinstance(config, str | os.PathLike) else config
        self.onnx_path = onnx_path
        self.extra_layer_bits = extra_layer_bits
        self.calibrate_type = calibrate_type
        self.calib_data_loader = calib_data_loader
        self.calibration_cache = calibration_cache
        self.input_name, self.output_name = input_names[0], output_names[0]
        self.backend_name = backend
        self.strict_datatype = strict_datatype
        top = max(batchsize, self.input_shape[0], max_batch or 0)
        self.options = BuildOptions(
            max_batch=top, opt_batch=batchsize, threads=threads, keep_pools_float=keep_pools_float
        )
        self.engine: Engine | None = None
        self.qdq = None
        self._calibrated_model: nn.Module | None = None  # PTQ straight from the backend

    def _backend(self):
        backend = get_backend(self.backend_name)
        if isinstance(backend, TensorRTBackend):
            backend.strict_datatype = self.strict_datatype
        return backend

    def _calibration(self) -> dict | None:
        if self.config is not None or quantized_layers(self.model):
            return self.config
        if self.calib_data_loader is None:
            raise ConfigError(
                "nothing to build: pass config=<calibration config>, a model quantized with mixq, "
                "or calib_data_loader=... for post-training calibration"
            )
        cache = Path(self.calibration_cache) if self.calibration_cache else None
        if cache is not None and cache.is_file():
            return load_calibration_config(cache)
        calibrated = copy.deepcopy(self.model)
        prepare_(calibrated, all_int8_config(self.calibrate_type), PTQ(), example_input=torch.randn(*self.input_shape))

        def loop(m):
            for batch in self.calib_data_loader:
                m(batch[0] if isinstance(batch, list | tuple) else batch)

        calibrate_(calibrated, loop)
        self._calibrated_model = calibrated
        config = export_calibration(calibrated)
        if cache is not None:
            save_calibration_config(config, cache)
        return config

    def compress(self) -> ModelSpeedup:
        """Export the Q/DQ ONNX model and build the engine. A failure leaves any previous engine in place."""
        backend = self._backend()
        calibration = self._calibration()
        model = self._calibrated_model if self._calibrated_model is not None else self.model
        qdq = export_qdq_onnx(
            model,
            self.input_shape,
            calibration,
            self.extra_layer_bits,
            self.onnx_path,
            self.input_name,
            self.output_name,
        )
        self.engine = backend.build(qdq, self.input_shape, self.options)
        self.qdq = qdq
        return self

    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineError("no engine yet: call compress() or load_quantized_model(path) first")
        return self.engine

    def inference(self, x) -> tuple[torch.Tensor, float]:
        """(output, seconds) for one batch; the output is a CPU float32 tensor."""
        engine = self._engine()
        start = time.perf_counter()
        out = engine.run(x)
        return out, time.perf_counter() - start

    def export_quantized_model(self, path: str | os.PathLike) -> Path:
        return self._engine().save(path)

    def load_quantized_model(self, path: str | os.PathLike) -> ModelSpeedup:
        self.engine = load_engine(path)
        return self

    def report(self, compare_float: bool = False, batch: int | None = None, runs: int = 20) -> PlacementReport:
        """Placement per layer; with ``compare_float`` also per-layer times of this engine and of a float
        engine of the same model on the same backend, at ``batch`` (default: the optimization batch)."""
        engine = self._engine()
        report = PlacementReport(engine.backend, engine.placement())
        if hasattr(engine, "unattributed_qdq"):
            report.glue_qdq = engine.unattributed_qdq()
        if compare_float:
            b = batch or self.options.opt_batch
            x = torch.randn(b, *self.input_shape[1:])
            float_qdq = export_qdq_onnx(self.model, self.input_shape, {}, 32, None, self.input_name, self.output_name)
            float_engine = self._backend().build(float_qdq, self.input_shape, self.options)
            groups = _fusion_groups(self.model, engine.layers, x[:1])
            report.times = _group_times(engine.profile(x, runs), groups)
            report.float_times = _group_times(float_engine.profile(x, runs), groups)
            report.groups = {k: v for k, v in groups.items() if len(v) > 1}
            report.batch = b
        return report


def _execution_order(model: nn.Module, layers: dict, example: torch.Tensor) -> list[str]:
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in model.named_modules()
        if n in layers
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order + [n for n in layers if n not in order]


def _fusion_groups(model: nn.Module, layers: dict, example: torch.Tensor) -> dict[str, list[str]]:
    """Each weighted layer with the ReLU/ReLU6 that directly follows it in execution order: backends fuse
    the pair (float: FusedConv/FusedGemm; int8: the ReLU becomes the quantized range), so they are timed
    as one."""
    names = _execution_order(model, layers, example)
    groups: dict[str, list[str]] = {}
    leader = None
    for n in names:
        op = layers[n]["op_type"]
        if op in ("ReLU", "ReLU6") and leader is not None:
            groups[leader].append(n)
            leader = None
            continue
        groups[n] = [n]
        leader = n if op in ("Conv1d", "Conv2d", "Linear") else None
    return groups


def _group_times(rows: list[LayerTime], groups: dict[str, list[str]]) -> dict[str, float]:
    times = {r.layer: r.microseconds for r in rows}
    out = {leader: sum(times.get(m, 0.0) for m in members) for leader, members in groups.items()}
    if "(glue)" in times:
        out["(glue)"] = times["(glue)"]
    return out


class ModelSpeedupTensorRT(ModelSpeedup):
    """NNI's ``ModelSpeedupTensorRT``: :class:`ModelSpeedup` on the TensorRT backend. Without TensorRT it
    raises a clear error pointing to ``ModelSpeedup(..., backend="onnxruntime")``."""

    def __init__(self, model, input_shape, config=None, **kwargs):
        backend = kwargs.pop("backend", "tensorrt")
        if backend == "tensorrt" and not TensorRTBackend().is_available():
            raise EngineError(
                "ModelSpeedupTensorRT needs TensorRT 10+ and a CUDA GPU, which this machine lacks; use "
                "mixq.nni.ModelSpeedup(model, input_shape, config=..., backend='onnxruntime') for the CPU engine"
            )
        super().__init__(model, input_shape, config, backend=backend, **kwargs)
