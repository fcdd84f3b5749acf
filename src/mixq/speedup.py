"""Orchestration, the speedup half of the NNI tutorial: model + calibration config -> Q/DQ export -> an
engine from the backend registry, and the placement report of what each layer actually runs as."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ._errors import ConfigError
from .auto import Selection, candidate_backends, select_engine
from .backends import BuildOptions, Engine, EngineError, get_backend, load_engine
from .calibration import load_calibration_config, save_calibration_config
from .config import KEYS as CONFIG_LIST_KEYS
from .config import is_calibration_config
from .export import export_qdq_onnx
from .quantization import PTQ, calibrate_, deploy_model, export_calibration, prepare_, quantized_layers
from .report import PlacementReport, fusion_groups, group_times

__all__ = ["ModelSpeedup", "all_int8_config", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "auto"  # build the engines this machine has, time them, keep the fastest (mixq.auto)


def all_int8_config(observer: str = "minmax") -> list[dict]:
    """The all-8-bit config used for PTQ straight from the backend: every conv/linear input and weight,
    every ReLU output."""
    return [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["default"], "observer": observer},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"], "observer": observer},
    ]


def _check_calibration_type(config) -> None:
    """``config`` must be a calibration config; a config_list (or one of its entries) says what to do instead."""
    looks_like_config_list = isinstance(config, list) or (
        isinstance(config, dict) and not is_calibration_config(config) and any(k in CONFIG_LIST_KEYS for k in config)
    )
    if looks_like_config_list:
        what = "a config_list entry" if isinstance(config, dict) else "a list (a config_list?)"
        raise ConfigError(
            f"config must be a calibration config (as export_model returns), got {what}; quantize with the "
            "config_list first (QAT_Quantizer(model, config_list, ...)) and pass the quantized model, or pass "
            "calib_data_loader=... with extra_layer_bits=8 for post-training calibration of every layer"
        )
    if config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"config must be a calibration config (a dict, as export_model returns) or its file path, "
            f"got {type(config).__name__}"
        )


class ModelSpeedup:
    """Build a real engine from a model and its calibration config.

    ``model``: a mixq-quantized model (its calibration is used unless ``config`` is given), or the float
    model saved by ``export_model`` plus ``config``. Without either, NNI's meaning of ``extra_layer_bits``
    applies to every layer: 32 builds the float engine, 16 an fp16 engine (backends with fp16 kernels
    only), 8 an all-int8 engine calibrated from ``calib_data_loader`` with ``calibrate_type`` (an observer
    name); ``calibration_cache`` keeps that calibration as JSON and reuses it when present.

    ``backend``: ``"auto"`` (default) builds the candidate engines this machine can run, times them at
    ``batchsize`` and keeps the fastest, never a quantized engine slower than the fastest float one
    (``self.selection`` and the report say what was tried); or a backend name (``onnxruntime``,
    ``openvino``, ``tensorrt``). ``batchsize`` is the optimization batch; TensorRT engines accept batches
    up to ``max(batchsize, input_shape[0])`` (or ``max_batch``).
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        config: dict | str | os.PathLike | None = None,
        onnx_path: str | os.PathLike | None = None,
        extra_layer_bits: int = 32,
        strict_datatype: bool = True,
        calibrate_type: str = "minmax",
        calib_data_loader: Iterable | None = None,
        calibration_cache: str | os.PathLike | None = None,
        batchsize: int = 1,
        input_names: Sequence[str] = ("actual_input_1",),
        output_names: Sequence[str] = ("output1",),
        backend: str = DEFAULT_BACKEND,
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
        if extra_layer_bits not in (8, 16, 32):
            raise ConfigError(f"extra_layer_bits must be 8, 16 or 32, got {extra_layer_bits!r}")
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.config = load_calibration_config(config) if isinstance(config, str | os.PathLike) else config
        _check_calibration_type(self.config)
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
            max_batch=top,
            opt_batch=batchsize,
            threads=threads,
            keep_pools_float=keep_pools_float,
            strict_precision=strict_datatype,
        )
        self.engine: Engine | None = None
        self.selection: Selection | None = None  # what backend="auto" tried
        self.qdq = None
        self._calibrated_model: nn.Module | None = None  # PTQ straight from the backend

    def _backend_names(self) -> list[str]:
        """The backends to build on (checked before any work): every usable one for ``auto``."""
        if self.backend_name != "auto":
            get_backend(self.backend_name)
            return [self.backend_name]
        on_cuda = any(t.is_cuda for t in (*self.model.parameters(), *self.model.buffers()))
        return candidate_backends(on_cuda)

    def _float_model_and_calibration(self) -> tuple[nn.Module, dict]:
        """The float model and calibration the export takes: a prepared model gives its deploy copy (BN
        folded, DoReFa applied) and its own calibration unless ``config`` overrides it."""
        model = self._calibrated_model if self._calibrated_model is not None else self.model
        if quantized_layers(model):
            return deploy_model(model), self.config if self.config is not None else export_calibration(model)
        return model, self._calibration()

    def _calibration(self) -> dict | None:
        if self.config is not None or quantized_layers(self.model):
            return self.config
        if self.extra_layer_bits != 8:
            return {}  # NNI: every layer at extra_layer_bits (32 float, 16 fp16)
        if self.calib_data_loader is None:
            raise ConfigError(
                "extra_layer_bits=8 without a config quantizes every layer, which needs calib_data_loader=... "
                "for post-training calibration (or pass config=<calibration config>, or a model quantized with mixq)"
            )
        cache = Path(self.calibration_cache) if self.calibration_cache else None
        if cache is not None and cache.is_file():
            return load_calibration_config(cache)
        calibrated = copy.deepcopy(self.model)
        prepare_(calibrated, all_int8_config(self.calibrate_type), PTQ(), example_input=torch.randn(*self.input_shape))

        device = next((t.device for t in (*calibrated.parameters(), *calibrated.buffers())), torch.device("cpu"))

        def loop(m):
            for batch in self._calibration_batches():
                m(batch.to(device))

        calibrate_(calibrated, loop)
        self._calibrated_model = calibrated
        config = export_calibration(calibrated)
        if cache is not None:
            save_calibration_config(config, cache)
        return config

    def _calibration_batches(self):
        """The batches of ``calib_data_loader`` (a DataLoader, any iterable of tensors or (input, label)
        pairs, or one tensor, split into chunks of ``max(batchsize, 32)``), each checked against
        ``input_shape``, as CPU float tensors. A one-shot iterator is read once and kept, so that every pass
        (two for histogram observers, one more for the backend's legalization) sees the same data."""
        data = self.calib_data_loader
        if data is None:
            return
        if isinstance(data, torch.Tensor):
            data = torch.split(data, max(self.options.opt_batch, 32))
        elif iter(data) is data:
            data = self.calib_data_loader = list(data)
        for i, batch in enumerate(data):
            x = batch[0] if isinstance(batch, list | tuple) else batch
            if (
                not isinstance(x, torch.Tensor)
                or x.dim() != len(self.input_shape)
                or x.shape[1:] != self.input_shape[1:]
            ):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ConfigError(
                    f"calib_data_loader batch {i}: expected input batches shaped {('batch', *self.input_shape[1:])}, "
                    f"got {got}"
                )
            yield x.detach().float().cpu()

    def _build_options(self) -> BuildOptions:
        """The build options, with the first calibration batches (up to 8 batches and 1024 images) for
        backends whose legalization calibrates tensors the config leaves float (ONNX Runtime: conv outputs
        feeding residual adds)."""
        batches, images = [], 0
        for batch in itertools.islice(self._calibration_batches(), 8):
            batches.append(batch.numpy())
            images += len(batch)
            if images >= 1024:
                break
        if not batches:
            return self.options
        return dataclasses.replace(self.options, calibration_data=tuple(batches))

    def compress(self) -> ModelSpeedup:
        """Export the Q/DQ ONNX model and build the engine (with ``auto``: build the candidates, time them,
        keep the fastest). A failure leaves any previous engine in place."""
        backends = self._backend_names()
        self._calibration()  # PTQ straight from the backend, when asked, before the export
        model, calibration = self._float_model_and_calibration()
        extra = 16 if self.extra_layer_bits == 16 else 32
        qdq = self._export(model, calibration, extra, self.onnx_path)
        options = self._build_options()
        if len(backends) == 1 and self.backend_name != "auto":
            self.engine = get_backend(backends[0]).build(qdq, self.input_shape, options)
        else:
            self.engine, self.selection = self._select(model, qdq, backends, options)
        self.qdq = qdq
        return self

    def _export(self, model, calibration: dict, extra_layer_bits: int, path=None):
        return export_qdq_onnx(
            model, self.input_shape, calibration, extra_layer_bits, path, self.input_name, self.output_name
        )

    def _select(self, model, qdq, backends: list[str], options: BuildOptions) -> tuple[Engine, Selection]:
        def build(name, graph):
            return lambda: get_backend(name).build(graph, self.input_shape, options)

        requested_quantized = any(info["precision"] != "fp32" for info in qdq.layers.values())
        float_qdq = self._export(model, {}, 32) if requested_quantized else qdq
        quantized = {n: build(n, qdq) for n in backends} if requested_quantized else {}
        floats = {n: build(n, float_qdq) for n in backends}
        x = torch.randn(self.options.opt_batch, *self.input_shape[1:])
        return select_engine(quantized, floats, x)

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
        report.selection = self.selection
        if hasattr(engine, "unattributed_qdq"):
            report.glue_qdq = engine.unattributed_qdq()
        if compare_float:
            b = batch or self.options.opt_batch
            x = torch.randn(b, *self.input_shape[1:])
            source = self._calibrated_model if self._calibrated_model is not None else self.model
            float_model = deploy_model(source) if quantized_layers(source) else source
            float_qdq = export_qdq_onnx(float_model, self.input_shape, {}, 32, None, self.input_name, self.output_name)
            float_engine = get_backend(engine.backend).build(float_qdq, self.input_shape, self.options)
            device = next((t.device for t in self.model.parameters()), torch.device("cpu"))
            groups = fusion_groups(self.model, engine.layers, x[:1].to(device))
            report.times = group_times(engine.profile(x, runs), groups)
            report.float_times = group_times(float_engine.profile(x, runs), groups)
            report.groups = {k: v for k, v in groups.items() if len(v) > 1}
            report.batch = b
        return report
