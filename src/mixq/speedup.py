"""Orchestration, the speedup half of the NNI tutorial: model + calibration config -> Q/DQ export -> an
engine from the backend registry, and the placement report of what each layer actually runs as."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._errors import ConfigError
from .auto import Selection, candidate_backends, select_engine
from .backends import BuildOptions, Engine, EngineError, get_backend, load_engine
from .backends.base import GLUE_PRECISIONS
from .calibration import (
    is_bits_config,
    load_calibration_cache,
    load_calibration_config,
    normalize_calibration_config,
    save_calibration_cache,
)
from .config import DEFAULT_DTYPE, DEFAULT_SCHEME, config_list_from_bits, is_calibration_config
from .config import KEYS as CONFIG_LIST_KEYS
from .export import export_qdq_onnx
from .primitives import choose_qparams_from_tensor
from .quantization import PTQ, calibrate_, deploy_model, export_calibration, prepare_, quantized_layers
from .report import PlacementReport, fusion_groups, group_times
from .spec import QuantSpec

__all__ = ["ModelSpeedup", "all_int8_config", "all_fp8_config", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "auto"  # build the engines this machine has, time them, keep the fastest (mixq.auto)


def all_int8_config(model: nn.Module, observer: str = "minmax") -> list[dict]:
    """The all-8-bit config used for PTQ straight from the backend: every conv/linear input and weight,
    every ReLU / ReLU6 output (of the types ``model`` has)."""
    relus = sorted({type(m).__name__ for m in model.modules()} & {"ReLU", "ReLU6"})
    config = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["default"], "observer": observer}]
    if relus:
        config.append({"quant_types": ["output"], "quant_bits": 8, "op_types": relus, "observer": observer})
    return config


def all_fp8_config(model: nn.Module, observer: str = "minmax") -> list[dict]:
    """:func:`all_int8_config`'s coverage in fp8 (e4m3): ``quant_dtype`` ``"fp8"`` on every entry."""
    return [{**entry, "quant_dtype": "fp8"} for entry in all_int8_config(model, observer)]


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


def check_float_glue(value) -> None:
    """``float_glue`` is ``"fp32"`` or ``"fp16"`` (:class:`mixq.backends.BuildOptions`), else one ConfigError line."""
    if value not in GLUE_PRECISIONS:
        raise ConfigError(f"float_glue must be 'fp32' or 'fp16' (the cuda backend's float ops), got {value!r}")


class ModelSpeedup:
    """Build a real engine from a model and its calibration config.

    ``model``: a mixq-quantized model (its calibration is used unless ``config`` is given), or the float
    model saved by ``export_model`` plus ``config``. Without either, NNI's meaning of ``extra_layer_bits``
    applies to every layer: 32 builds the float engine, 16 an fp16 engine (backends with fp16 kernels
    only), 8 an all-int8 engine calibrated from ``calib_data_loader`` with ``calibrate_type`` (an observer
    name); ``calibration_cache`` keeps that calibration as JSON and reuses it when present.

    ``config`` may also be NNI's bits-only config (``{'conv1': {'weight_bits': 8, 'output_bits': 8}, ...}``,
    8 int8, 16 fp16, 32 float per layer): the layers are then calibrated from ``calib_data_loader``, as NNI's
    TensorRT speedup does (see :func:`mixq.config.config_list_from_bits`). A calibration config may come from
    mixq, from ``torch.load`` of its ``.pth`` or from NNI (tensor values); see
    :func:`mixq.calibration.normalize_calibration_config`. NNI-made weight entries whose integer type the dict
    does not record (a nonzero zero point and no ``weight_qspec``) are re-quantized from the model's weights on
    mixq's default weight spec, as NNI's TensorRT backend quantizes weights itself.

    ``backend``: ``"auto"`` (default) builds the candidate engines this machine can run, times them at
    ``batchsize`` and keeps the fastest, never a quantized engine slower than the fastest float one
    (``self.selection`` and the report say what was tried); or a backend name (``onnxruntime``,
    ``openvino``, ``tensorrt``). ``batchsize`` is the optimization batch; TensorRT engines accept batches
    up to ``max(batchsize, input_shape[0])`` (or ``max_batch``), and :meth:`inference` runs a larger batch in
    chunks of ``batchsize`` (as NNI's ``inference`` does).
    ``float_glue``: ``"fp32"`` (default) or ``"fp16"``, the precision of the ``cuda`` backend's float ops that
    no layer covers (LayerNorm, GELU, attention, residual adds; :class:`mixq.backends.BuildOptions`).

    ``calibration_cache``: reused only when it was made for the same model weights, layer config, input shape
    and ``calibrate_type`` (a digest is stored with it); otherwise calibration runs again and replaces it.
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
        float_glue: str = "fp32",
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if len(input_shape) < 2 or any(int(d) < 1 for d in input_shape):
            raise ConfigError(f"input_shape must be (batch, ...) with positive sizes, got {tuple(input_shape)}")
        if isinstance(batchsize, bool) or not isinstance(batchsize, int) or batchsize < 1:
            raise ConfigError(f"batchsize must be a positive int, got {batchsize!r}")
        check_float_glue(float_glue)
        if extra_layer_bits not in (8, 16, 32):
            raise ConfigError(f"extra_layer_bits must be 8, 16 or 32, got {extra_layer_bits!r}")
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        if isinstance(config, str | os.PathLike):
            config = load_calibration_config(config)
        self.layer_config: list[dict] | None = None  # what PTQ straight from the backend calibrates
        if is_bits_config(config):
            if quantized_layers(model):
                raise ConfigError(
                    "config gives only bits per layer (NNI's speedup config), for post-training calibration of a "
                    f"float model, but {type(model).__name__} is already quantized with mixq; pass config=None to "
                    "build it with its own calibration"
                )
            self.layer_config = config_list_from_bits(model, config, calibrate_type)
            if self.layer_config and calib_data_loader is None:
                raise ConfigError(
                    "config gives only bits per layer (NNI's speedup config), which needs calib_data_loader=... to "
                    "calibrate them (or pass a calibration config, as export_model returns)"
                )
            config = None
        _check_calibration_type(config)
        self.config = None if config is None else normalize_calibration_config(config, source="config")
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
            float_glue=float_glue,
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
        folded, DoReFa applied) and its own calibration unless ``config`` overrides it; PTQ straight from the
        backend runs here when asked."""
        calibration = self._calibration()
        model = self._calibrated_model if self._calibrated_model is not None else self.model
        if quantized_layers(model):
            if calibration is None:
                calibration = export_calibration(model)
            model = deploy_model(model)
        return model, _complete_weight_qparams(model, calibration)

    def _calibration(self) -> dict | None:
        """The calibration config to build with; None for a prepared model without ``config`` (it has its own)."""
        if self.config is not None or quantized_layers(self.model):
            return self.config
        if self._calibrated_model is not None:
            return export_calibration(self._calibrated_model)
        layer_config = self.layer_config
        if layer_config is None:
            if self.extra_layer_bits != 8:
                return {}  # NNI: every layer at extra_layer_bits (32 float, 16 fp16)
            if self.calib_data_loader is None:
                raise ConfigError(
                    "extra_layer_bits=8 without a config quantizes every layer, which needs calib_data_loader=... "
                    "for post-training calibration (or pass config=<calibration config>, or a model quantized with "
                    "mixq)"
                )
            layer_config = all_int8_config(self.model, self.calibrate_type)
        if not layer_config:
            return {}  # a bits config leaving every layer at 32 bits
        cache = Path(self.calibration_cache) if self.calibration_cache else None
        key = self._cache_key(layer_config) if cache is not None else ""
        cached = load_calibration_cache(cache, key) if cache is not None else None
        if cached is not None:
            return cached
        calibrated = copy.deepcopy(self.model)
        prepare_(calibrated, layer_config, PTQ(), example_input=torch.randn(*self.input_shape))

        device = next((t.device for t in (*calibrated.parameters(), *calibrated.buffers())), torch.device("cpu"))

        def loop(m):
            for batch in self._calibration_batches():
                m(batch.to(device))

        calibrate_(calibrated, loop)
        self._calibrated_model = calibrated
        config = export_calibration(calibrated)
        if cache is not None:
            save_calibration_cache(config, cache, key)
        return config

    def _cache_key(self, layer_config: list[dict]) -> str:
        """A digest of what a calibration is made from: the model's weights and buffers, the layer config,
        the input shape (without the batch) and the calibrator."""
        h = hashlib.sha256()
        h.update(json.dumps([layer_config, self.calibrate_type, self.input_shape[1:]], sort_keys=True).encode())
        for name, t in self.model.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

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

        float_qdq = self._export(model, {}, 32) if qdq.requests_quantized else qdq
        quantized = {n: build(n, qdq) for n in backends} if qdq.requests_quantized else {}
        floats = {n: build(n, float_qdq) for n in backends}
        for n in backends:  # the strongest float path on a GPU (torch fp16 + CUDA graph, compiled), where offered
            strongest = getattr(get_backend(n), "strongest_float", None)
            if strongest is not None:
                floats[f"{n} torch-fp16"] = lambda s=strongest: s(model, self.input_shape, float_qdq.layers, options)
        x = torch.randn(self.options.opt_batch, *self.input_shape[1:])
        return select_engine(quantized, floats, x)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineError("no engine yet: call compress() or load_quantized_model(path) first")
        return self.engine

    def inference(self, x) -> tuple[torch.Tensor, float]:
        """(output, seconds) for one batch; the output is a float32 tensor, on the GPU for a CUDA batch on a GPU
        engine (nothing copied back), else on the CPU. A batch larger than the
        engine's maximum batch runs in chunks of ``batchsize`` (as NNI's ``inference`` does); the seconds are
        then the sum of the chunks' engine times."""
        engine = self._engine()
        n = len(x) if isinstance(x, torch.Tensor | np.ndarray) and x.ndim > 0 else 0
        chunks = (
            [x]
            if n <= self.options.max_batch
            else [x[i : i + self.options.opt_batch] for i in range(0, n, self.options.opt_batch)]
        )
        outputs, seconds = [], 0.0
        for chunk in chunks:
            start = time.perf_counter()
            out = engine.run(chunk)
            if out.is_cuda:  # a GPU engine keeps a CUDA input's output there: time until it is ready
                torch.cuda.synchronize(out.device)
            outputs.append(out)
            seconds += time.perf_counter() - start
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), seconds

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


def _complete_weight_qparams(model: nn.Module, calibration: dict) -> dict:
    """Give every weight entry the calibration does not describe fully a scale and zero point from the
    model's weight, on mixq's default weight spec at its ``weight_bits``, recorded in ``weight_qspec``.

    That is an NNI-made entry (no ``weight_qspec``) whose zero points are not all 0: NNI's default weight
    quantization is per-tensor affine uint, but its dicts do not say so, and its TensorRT backend ignores the
    scales and quantizes the weights itself. Entries with zero points of 0 are read as symmetric signed
    weights, which they are under every NNI setting that gives them. Returns a new dict."""
    modules = dict(model.named_modules())
    out = dict(calibration)
    for name, entry in calibration.items():
        module = modules.get(name)
        zps = entry.get("weight_zero_point", 0)
        if (
            "weight_qspec" in entry
            or "weight_bits" not in entry
            or not isinstance(getattr(module, "weight", None), torch.Tensor)
        ):
            continue
        if not any(z != 0 for z in (zps if isinstance(zps, list) else [zps])):
            continue
        spec = QuantSpec.from_nni(entry["weight_bits"], DEFAULT_SCHEME["weight"], DEFAULT_DTYPE["weight"], axis=0)
        scale, zp = choose_qparams_from_tensor(module.weight.detach().float().cpu(), spec)
        out[name] = {
            **entry,
            "weight_scale": scale.tolist(),
            "weight_zero_point": zp.tolist(),
            "weight_qspec": spec.to_dict(),
        }
    return out
