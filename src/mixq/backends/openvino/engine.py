"""OpenVINO (CPU) backend: reads the same Q/DQ ONNX and lets OpenVINO's low-precision transformations
legalize it (BatchNorm folded into per-channel scales, residual adds and ReLUs fused into int8 convs).

The engine file holds the Q/DQ ONNX, not a compiled blob: a blob is specific to the CPU it was compiled on,
so the model is compiled where it is loaded and an engine built on one CPU class runs right on another.
Each batch size gets its own static-shape compilation (OpenVINO's CPU plugin is fastest on static shapes),
made on first use and kept.

On x86 CPUs without VNNI, OpenVINO's u8 x s8 int8 convolutions saturate for weights with |q| > 64
(:mod:`..cpu_features`), and no OpenVINO setting avoids that (EXECUTION_MODE_HINT=ACCURACY gives the same
wrong results; measured in benchmarks/results/openvino-exactness-cpu.md). There the engine splits each such
weight into two int8 halves with |q| <= 64 and runs the layer as two int8 kernels whose outputs are added:
exact, still int8, about twice the layer's int8 work. 7-bit weights need no split.

fp8 (float8e4m3fn, opset 19) layers: OpenVINO's CPU plugin has no fp8 convolutions; it turns each fp8
Q/DQ pair into a FakeConvert and runs the layer in f32 between them (emulated). Two things measured in
benchmarks/results/fp8-cpu-backends.md: OpenVINO 2026.4 misreads float8e4m3fn initializers stored in the
ONNX ``int32_data`` field (``onnx.helper.make_tensor``'s default; weights come out wrong), so the engine
rewrites them as ``raw_data`` first (:func:`fp8_initializers_as_raw`; same values); and its FakeConvert rounds
through float16 before float8, so a value within float16 rounding of the midpoint between two fp8 values
can round to the other neighbour, one fp8 step off; through the layers that adds up (measured on real
models in the same file), so an engine with fp8 layers sets :attr:`Engine.inexact` (``backend="auto"`` skips
it) and warns; ONNX Runtime runs the same graph exactly.
"""

from __future__ import annotations

import json
import tempfile
import threading
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..base import (
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    Legalized,
    fold_fp8_weights,
    fp8_emulated_note,
    layer_of_node,
    register_backend,
)
from ..cpu_features import (
    SAFE_U8S8_WEIGHT,
    cpu_has_vnni,
    int8_weight_maxima,
    layer_maxima,
    saturation_message,
    split_int8_weights,
    weights_to_uint8,
)
from ..profiling import LayerSamples

__all__ = ["OpenVINOBackend", "OpenVINOEngine", "fp8_initializers_as_raw", "fp8_message"]

# Runtime layer types that do a layer's arithmetic; everything else (Reorder, standalone FakeQuantize,
# Reshape, Input/Output) is glue between layers.
COMPUTE_TYPES = frozenset(
    {
        "Convolution",
        "Deconvolution",
        "FullyConnected",
        "FullyConnectedQuantizedLegacy",
        "MatMul",
        "Pooling",
        "Eltwise",
        "Reduce",
        "Subgraph",
    }
)
INT_PRECISIONS = frozenset({"u8", "i8", "U8", "I8"})
MAX_COMPILED_SHAPES = 8
# A static-batch compilation must agree with the dynamic one this well (_agreeing). Far below what float rounding
# alone causes (the lowest rounding floor measured: 21.8 dB, ViT-B/16 fp8, benchmarks/results/rounding-floor.md;
# correct static and dynamic compilations of ResNet-18 int8 agree to 55 dB), far above a miscompilation (-212 dB).
STATIC_AGREEMENT_DB = 10.0
FP8_NOTE = fp8_emulated_note(
    "OpenVINO",
    "(FakeConvert), rounding through float16 first: values next to the midpoint of two fp8 values may land one "
    "fp8 step off",
)


def fp8_initializers_as_raw(model) -> int:
    """Store every float8e4m3fn initializer of ``model`` in ``raw_data`` (in place; the values are unchanged);
    return how many were rewritten. OpenVINO 2026.4 reads only that form right (see the module doc)."""
    from onnx import TensorProto, numpy_helper

    done = 0
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT8E4M3FN and not init.raw_data:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
            done += 1
    return done


def fp8_message(layers: list[str]) -> str:
    """Why an OpenVINO engine with fp8 layers is not exact (see the module doc), naming the layers."""
    shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    return (
        f"OpenVINO engine is not exact for its fp8 layers ({shown}): OpenVINO rounds to float8 through float16, "
        "so values next to the midpoint of two fp8 values land one fp8 step off the fake-quant model; "
        "backend onnxruntime runs fp8 layers exactly (emulated in fp32)"
    )


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise EngineError("backend 'openvino' needs the openvino package (pip install openvino)") from e
    return openvino


def _agreement_db(ref: np.ndarray, out: np.ndarray) -> float:
    """SQNR of ``out`` against ``ref`` in dB (-inf for a non-finite output, inf when identical)."""
    if not (np.isfinite(out).all() and np.isfinite(ref).all()):
        return float("-inf")
    noise = float(((ref - out) ** 2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(max(float((ref**2).sum()), 1e-300) / noise))


class OpenVINOEngine(Engine):
    backend = "openvino"

    def __init__(self, onnx_bytes: bytes, input_shape, layers: dict, options: BuildOptions):
        """``onnx_bytes``: the backend-neutral Q/DQ model (int8 weights). Which weights become uint8 is
        decided here, where the model is compiled, so an engine file built on one CPU class runs right on
        another (see :meth:`_weight_layout`)."""
        super().__init__(input_shape, layers, max_batch=None)
        ov = _ov()
        self.options = options
        self.onnx_bytes = onnx_bytes
        model_bytes = self._weight_layout(onnx_bytes)
        self.core = ov.Core()
        self.model = self._read(model_bytes)
        self.float_weight_convs: list[str] = []
        if len(self.model.inputs) != 1 or len(self.model.outputs) != 1:
            raise EngineError(
                f"the model has {len(self.model.inputs)} inputs and {len(self.model.outputs)} outputs; mixq engines "
                "take one input tensor and return one output tensor (wrap the model to combine them)"
            )
        self._compiled: dict[tuple[int, bool], tuple[object, object]] = {}
        self._dynamic = None  # the dynamic-batch compilation, made when a static one is checked
        self.dynamic_batches: dict[int, float] = {}  # batch sizes whose static compilation was wrong (see _agreeing)
        self._checked: set[int] = set()  # batch sizes whose static compilation was checked (once per engine)
        self._lock = threading.RLock()  # one infer request per batch size: calls from several threads take turns
        self._request(self.input_shape[0])  # compile now, so a build error surfaces at build time
        self.float_weight_convs = self._fold_float_conv_weights(model_bytes)

    def _read(self, model_bytes: bytes):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "model.onnx"
            path.write_bytes(model_bytes)
            try:
                return self.core.read_model(str(path))
            except Exception as e:
                raise EngineError(f"OpenVINO could not read the model: {type(e).__name__}: {e}") from e

    def _fold_float_conv_weights(self, model_bytes: bytes) -> list[str]:
        """Where OpenVINO runs an int8 conv in f32 anyway (a ViT's 16x16 stride-16 patch conv, a ConvNeXt stem),
        give it its weights as float32 (the same values: the DequantizeLinear folded) and keep that model if more
        layers then run int8. Measured on torchvision's ViT-B/16 (OpenVINO 2026.4, AMX Xeon): with the patch conv's
        int8 weight DequantizeLinear in the graph, OpenVINO also keeps every attention ``out_proj`` and the second
        MLP Linear f32, dequantizing their int8 weights at run time; with float weights there, they run u8.
        Returns the conv layers so changed (also in the placement notes)."""
        import onnx

        from ..onnx_graph import constant_values, dequantize_node

        before = self.placement()
        slow = {r.layer for r in before if r.requested == "int8" and r.runs_as == "fp32" and "Conv" in r.op_type}
        if not slow:
            return []
        model = onnx.load_from_string(model_bytes)
        by_output = {o: n for n in model.graph.node for o in n.output}
        value = constant_values(model)
        folded = []
        for node in model.graph.node:
            dq = by_output.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
            if dq is None or dq.op_type != "DequantizeLinear" or layer_of_node(node.name, self.layers) not in slow:
                continue
            try:
                weight = dequantize_node(value, dq)
            except (KeyError, TypeError, ValueError):  # not a constant weight: leave it
                continue
            name = f"{node.name}/float_weight"
            model.graph.initializer.append(onnx.numpy_helper.from_array(weight.astype(np.float32), name))
            node.input[1] = name
            folded.append(layer_of_node(node.name, self.layers))
        if not folded:
            return []
        kept = (self.model, dict(self._compiled), self._dynamic, dict(self.dynamic_batches), set(self._checked))
        self.model = self._read(model.SerializeToString())
        self._compiled, self._dynamic, self.dynamic_batches, self._checked = {}, None, {}, set()
        self._request(self.input_shape[0])
        int8 = sum(r.runs_as in ("int8", "fused") for r in self.placement() if r.requested == "int8")
        if int8 > sum(r.runs_as in ("int8", "fused") for r in before if r.requested == "int8"):
            return sorted(set(folded))
        self.model, self._compiled, self._dynamic, self.dynamic_batches, self._checked = kept
        return []

    def _weight_layout(self, onnx_bytes: bytes) -> bytes:
        """The model to compile, with the weight layout for this CPU (``options.uint8_weights``):

        - None (default): on a CPU without VNNI, each layer with int8 weights |q| > 64 gets them split in two
          int8 halves with |q| <= 64 (:func:`..cpu_features.split_int8_weights`): exact and still int8, about
          twice the layer's int8 work (measured: benchmarks/results/openvino-exactness-cpu.md). A weight the
          split does not handle gets uint8 weights instead (exact, runs float). With VNNI: unchanged.
        - True: every int8 weight as uint8 with zero point 128 (OpenVINO runs those layers in float, exact).
        - False: int8 weights as they are: on a CPU without VNNI the layers with |q| > 64 are wrong; the
          engine warns and says so in ``inexact``.

        Sets ``split_layers``, ``uint8_layers`` and ``saturating_layers`` (each ``{layer: largest |q|}``)."""
        import onnx

        model = onnx.load_from_string(onnx_bytes)
        maxima = int8_weight_maxima(model)
        risky = set() if cpu_has_vnni() else {n for n, top in maxima.items() if top > SAFE_U8S8_WEIGHT}
        choice = self.options.uint8_weights
        to_split = risky if choice is None else set()
        split = split_int8_weights(model, to_split)
        to_uint8 = set(maxima) if choice else to_split - split
        weights_to_uint8(model, to_uint8)

        self.split_layers = layer_maxima({n: maxima[n] for n in split}, self.layers)
        self.uint8_layers = layer_maxima({n: maxima[n] for n in to_uint8}, self.layers)
        self.saturating_layers = layer_maxima({n: maxima[n] for n in risky}, self.layers) if choice is False else {}
        if self.saturating_layers:
            self.inexact = saturation_message("OpenVINO", self.saturating_layers)
            warnings.warn(self.inexact, stacklevel=3)
        fp8 = [name for name, info in self.layers.items() if info.get("precision") == "fp8"]
        if fp8:
            self.inexact = (self.inexact + "; " if self.inexact else "") + fp8_message(fp8)
            warnings.warn(fp8_message(fp8), stacklevel=3)
        return model.SerializeToString() if split or to_uint8 else onnx_bytes

    def _config(self, profiling: bool) -> dict:
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            # Float layers stay float32 (the default on CPUs with bf16 support would be bf16, which changes
            # the results of layers the user asked to keep in full precision).
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.options.threads)
        if profiling:
            config["PERF_COUNT"] = "YES"
        return config

    def _compile(self, batch: int | None, profiling: bool):
        """The model compiled for one static batch size, or (``batch=None``) with a dynamic batch."""
        model = self.model.clone()
        model.reshape({0: [batch if batch else -1, *self.input_shape[1:]]})
        try:
            return self.core.compile_model(model, "CPU", self._config(profiling))
        except Exception as e:
            raise EngineError(f"OpenVINO could not compile the model: {type(e).__name__}: {e}") from e

    def _request(self, batch: int, profiling: bool = False):
        with self._lock:
            key = (batch, profiling)
            if key in self._compiled:
                return self._compiled[key]
            if profiling and batch not in self._checked:
                self._request(batch)  # decide static vs dynamic for this batch first, as run() would
            if len(self._compiled) >= MAX_COMPILED_SHAPES:
                self._compiled.pop(next(iter(self._compiled)))
            if batch in self.dynamic_batches:
                compiled = self._compile(None, True) if profiling else self._dynamic
            else:
                compiled = self._compile(batch, profiling)
                if not profiling and batch not in self._checked:
                    compiled = self._agreeing(compiled, batch)
                    self._checked.add(batch)
            self._compiled[key] = (compiled, compiled.create_infer_request())
            return self._compiled[key]

    def _agreeing(self, static, batch: int):
        """``static``, or another compilation where ``static`` is the odd one out. OpenVINO 2026.4 compiles some
        Q/DQ graphs wrongly at some shapes: a 2-layer DistilBERT, sequence 16, at static batch 4 and 8 (every
        output ~1e9; batches 1-3 and 5 and the dynamic-batch model right; tests/test_hf_models.py), and the
        tiny ViT of the coverage suite with a dynamic batch (14 dB from its fake-quant model; static batch 2
        right). So each batch size is checked once per engine, on fresh normal values (never zeros), against the
        dynamic-batch model; if they disagree grossly (below ``STATIC_AGREEMENT_DB``, far below what rounding
        causes) a third compilation, static at batch + 1 on the same rows plus one, decides: the one it agrees
        with runs this batch size (the dynamic model in place of a wrong static one, with a warning;
        ``dynamic_batches``: batch -> SQNR of the replaced static compilation). With no two agreeing, the
        static one stays and the warning says so."""
        rng = np.random.default_rng(batch)
        probe = rng.standard_normal((batch + 1, *self.input_shape[1:])).astype(np.float32)
        if self._dynamic is None:
            self._dynamic = self._compile(None, False)
        out = np.asarray(static({0: probe[:batch]})[0], np.float64)
        ref = np.asarray(self._dynamic({0: probe[:batch]})[0], np.float64)
        if _agreement_db(ref, out) >= STATIC_AGREEMENT_DB:
            return static
        third = np.asarray(self._compile(batch + 1, False)({0: probe})[0], np.float64)[:batch]
        static_db, dynamic_db = _agreement_db(third, out), _agreement_db(third, ref)
        if static_db >= STATIC_AGREEMENT_DB or dynamic_db < STATIC_AGREEMENT_DB:
            if static_db < STATIC_AGREEMENT_DB:
                warnings.warn(
                    f"OpenVINO's compilations for batch {batch} (static, dynamic, static at batch {batch + 1}) all "
                    "disagree on a probe input: the static one is kept, and may be wrong",
                    stacklevel=4,
                )
            return static
        self.dynamic_batches[batch] = _agreement_db(ref, out)
        warnings.warn(
            f"OpenVINO's compilation for batch {batch} disagrees with its dynamic-batch one and with batch "
            f"{batch + 1}'s ({self.dynamic_batches[batch]:.1f} dB SQNR on a probe input): batch {batch} runs the "
            "dynamic-batch model",
            stacklevel=4,
        )
        return self._dynamic

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        x = self.check_input(x, check_finite).cpu()
        with self._lock:
            _, request = self._request(x.shape[0])
            request.infer({0: x.numpy()})
            return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

    def _runtime_ops(self):
        compiled, _ = self._request(self.input_shape[0])
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            fields = {k: info[k].astype(str) for k in ("layerType", "runtimePrecision", "originalLayersNames")}
            yield op.get_friendly_name(), fields

    def placement(self) -> list[LayerPlacement]:
        kernels: dict[str, list[str]] = defaultdict(list)
        precisions: dict[str, set[str]] = defaultdict(set)
        fused_into: dict[str, str] = {}
        for name, f in self._runtime_ops():
            if f["layerType"] not in COMPUTE_TYPES:
                continue
            owner = layer_of_node(name, self.layers)
            if owner is None:
                continue
            kernels[owner].append(f"{f['layerType']}({f['runtimePrecision']})")
            precisions[owner].add(f["runtimePrecision"])
            for original in filter(None, f["originalLayersNames"].split(",")):
                other = layer_of_node(original, self.layers)
                if other is not None and other != owner:
                    fused_into.setdefault(other, owner)
        rows = []
        for layer, info in self.layers.items():
            ks = tuple(kernels.get(layer, ()))
            requested = info["precision"]
            if ks:
                runs_as = "int8" if precisions[layer] & INT_PRECISIONS else "fp32"
                note = (
                    "asked int8, runs float (OpenVINO kept this layer in float)"
                    if (requested == "int8" and runs_as == "fp32")
                    else ""
                )
                if requested == "fp16":
                    note = "OpenVINO CPU runs fp16 requests in float32 here (INFERENCE_PRECISION_HINT f32)"
                if requested == "fp8":
                    note = FP8_NOTE
            elif layer in fused_into:
                runs_as, note = "fused", f"no kernel of its own: fused into {fused_into[layer]}"
            else:
                runs_as, note = "fused", "no kernel of its own: folded or removed by OpenVINO"
            if layer in self.float_weight_convs:
                note = (
                    "OpenVINO runs this conv in float32: given its weights as float32 (the same values), which "
                    "lets OpenVINO run other layers int8 (see OpenVINOEngine._fold_float_conv_weights)"
                )
            if layer in self.split_layers:
                note = (
                    f"int8 weights (|q| up to {self.split_layers[layer]}) split into two int8 halves with "
                    "|q| <= 64, run as two int8 kernels and added: exact on this CPU (no VNNI: one kernel would "
                    "saturate in int16), about twice the int8 work; 7-bit weights need one"
                )
            elif layer in self.uint8_layers and runs_as != "int8":
                note = (
                    f"given uint8 weights (zero point 128, same grid; |q| up to {self.uint8_layers[layer]}), "
                    "which OpenVINO runs in float: exact"
                    + (
                        ". Its int8 kernel would be wrong on this CPU (no VNNI: int16 saturation for |q| > 64); "
                        "7-bit weights run it int8 and exact"
                        if self.options.uint8_weights is None
                        else " (uint8_weights=True)"
                    )
                )
            elif layer in self.saturating_layers and requested == "int8":
                note = "NOT EXACT: int8 weights with |q| > 64 saturate on this CPU (no VNNI); use 7-bit weights"
            rows.append(LayerPlacement(layer, info["op_type"], requested, runs_as, ks, 0, note))
        return rows

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        """Per-layer time: median over ``runs`` (after 3 warm-up runs) of OpenVINO's performance counters.
        Compute nodes count for the layer they belong to; reorders and standalone quantize nodes under
        ``(glue)``."""
        x = self.check_input(x).cpu()
        compiled, request = self._request(x.shape[0], profiling=True)
        types = {
            op.get_friendly_name(): op.get_rt_info()["layerType"].astype(str)
            for op in compiled.get_runtime_model().get_ordered_ops()
        }
        feed = {0: x.numpy()}
        for _ in range(3):
            request.infer(feed)
        runs = max(1, int(runs))
        samples = LayerSamples(runs)
        for run in range(runs):
            request.infer(feed)
            for info in request.get_profiling_info():
                us = info.real_time.total_seconds() * 1e6
                if us <= 0:
                    continue
                owner = (
                    layer_of_node(info.node_name, self.layers) if types.get(info.node_name) in COMPUTE_TYPES else None
                )
                samples.add(owner or "(glue)", run, us, info.exec_type)
        return samples.layer_times()

    def members(self) -> dict[str, bytes]:
        # The canonical int8 model only: which weights become uint8 is re-decided on load.
        options = {"threads": self.options.threads, "uint8_weights": self.options.uint8_weights}
        return {"model.onnx": self.onnx_bytes, "options.json": json.dumps(options).encode()}


class OpenVINOBackend(Backend):
    name = "openvino"
    package = "openvino"
    device = "cpu"
    precisions = frozenset({"fp32", "int8"})  # fp16 runs fp32 (INFERENCE_PRECISION_HINT f32)
    emulated = frozenset({"fp8"})  # FakeConvert around fp32 kernels

    def legalize(self, model, layers: dict, options: BuildOptions) -> Legalized:
        """fp8 layers (see the module doc): fp8-grid weights folded to float32 (no fp8 kernels), the other
        float8e4m3fn initializers stored as ``raw_data`` (the form OpenVINO reads right). The weight layout for
        the CPU is decided where the engine is created."""
        import onnx

        legal = onnx.ModelProto()
        legal.CopyFrom(model)
        changed = len(fold_fp8_weights(legal)) + fp8_initializers_as_raw(legal)
        return Legalized(legal if changed else model, layers)

    def build_legal(self, legal: Legalized, input_shape, options: BuildOptions) -> OpenVINOEngine:
        return OpenVINOEngine(legal.model.SerializeToString(), input_shape, legal.layers, options)

    def engine_from_file(self, manifest, members, input_shape, layers) -> OpenVINOEngine:
        import onnx

        opts = json.loads(members["options.json"])
        options = BuildOptions(threads=opts["threads"], uint8_weights=opts.get("uint8_weights"))
        # Files saved before legalize() existed hold the model as exported: legalize it (a no-op otherwise).
        legal = self.legalize(onnx.load_from_string(members["model.onnx"]), layers, options)
        return OpenVINOEngine(legal.model.SerializeToString(), input_shape, legal.layers, options)


register_backend("openvino", OpenVINOBackend)
