"""ONNX Runtime (CPU) backend: builds an InferenceSession from the Q/DQ model with all graph optimizations,
and reads back what each layer became in ORT's optimized graph (QLinearConv/QGemm/... = int8)."""

from __future__ import annotations

import bisect
import json
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from ...spec import WEIGHTED_OP_TYPES
from ..base import (
    FLOAT_BIAS_NOTE,
    FUSED_INTO_NEIGHBOUR,
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    Legalized,
    copy_layers,
    fold_fp8_weights,
    fp8_emulated_note,
    layer_of_node,
    register_backend,
)
from ..cpu_features import (
    SAFE_U8S8_WEIGHT,
    cpu_has_vnni,
    int8_weight_maxima,
    max_abs_int8_weight,
    saturating_layers,
    saturation_message,
    weights_to_uint8,
)
from ..onnx_graph import GraphIndex
from ..profiling import LayerSamples
from .legalize import FP8_UNSAFE_REWRITES, LEGALIZED_KEY, float_output_convs, has_fp8, quantize_conv_outputs

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeEngine", "INT8_KERNELS"]

INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearReduceMean",
        "QLinearSoftmax",
        "NhwcMaxPool",
    }
)
QDQ_KERNELS = frozenset({"QuantizeLinear", "DequantizeLinear"})
GLUE_KERNELS = QDQ_KERNELS | {"Transpose", "ReorderInput", "ReorderOutput", "Constant"}
ACTIVATION_KERNELS = frozenset({"Relu", "Clip"})


def _note(info: dict, runs_as: str) -> str:
    """Why a layer runs other than asked, naming the cause where the export recorded it."""
    if info["precision"] == "fp16":
        return "ORT CPU has no fast fp16 kernels: runs fp32"
    if info["precision"] == "fp8" and runs_as != "fused":
        return fp8_emulated_note(
            "ORT",
            "(float8e4m3fn QuantizeLinear/DequantizeLinear kept, fp8-grid weights stored as float32, the layer "
            "computed in fp32)",
        )
    if info.get(LEGALIZED_KEY) and runs_as == "int8":
        return (
            f"output calibrated at build time on {info[LEGALIZED_KEY]} sample batches so that ORT runs it int8 "
            "(the config leaves it float)"
        )
    if info["precision"] == "int8" and runs_as == "fp32":
        bn = info.get("unfolded_bn")
        if bn:
            return (
                f"BatchNorm {bn!r} after this conv could not be folded (the conv's output is quantized before it, "
                "or also used elsewhere), so the conv output feeds a float BatchNorm"
            )
        if info.get("float_bias"):
            return FLOAT_BIAS_NOTE
        if info["op_type"] in ("Conv1d", "Conv2d"):
            return (
                "asked int8, runs float: ORT runs a conv int8 only with a quantized output; quantize its output "
                "in the config, pass calib_data_loader=... so the build calibrates it, or use backend openvino/auto"
            )
        return "asked int8, runs float (ORT found no int8 kernel for this Q/DQ pattern)"
    if runs_as == "fused":
        return f"{FUSED_INTO_NEIGHBOUR} (Conv+ReLU, or ReLU into a quantized range)"
    return ""


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, qdq_bytes: bytes, input_shape, layers: dict, options: BuildOptions):
        """``qdq_bytes``: the backend-neutral Q/DQ model (int8 weights). The weight layout for this CPU
        (int8, or uint8 + 128 where the CPU lacks VNNI) is decided here, where the session runs, so an
        engine file built on one CPU class runs right on another."""
        super().__init__(input_shape, layers, max_batch=None)
        import onnx
        import onnxruntime as ort

        self.options = options
        self.qdq_bytes = qdq_bytes
        model = onnx.load_from_string(qdq_bytes)
        # Why uint8 weights (see .cpu_features): ResNet-18 runs 750 vs 472 ms with them (7-bit int8 weights,
        # benchmarks/results/engines-cpu-603a7af.md), but without them, on a CPU without VNNI, trained 8-bit
        # weights give wrong results (98.19% top-1 agreement with the fake-quant LeNet, up to 104 output
        # steps off: benchmarks/results/ort-exactness-cpu.md).
        uint8 = options.uint8_weights
        vnni = cpu_has_vnni()
        if uint8 is None:
            uint8 = not vnni and max_abs_int8_weight(model) > SAFE_U8S8_WEIGHT
        self.uint8_weights = bool(uint8)
        if self.uint8_weights:
            weights_to_uint8(model)
        elif not vnni:
            risky = saturating_layers(int8_weight_maxima(model), layers)
            if risky:
                self.inexact = saturation_message("ONNX Runtime", risky)
                warnings.warn(self.inexact, stacklevel=2)
        self.fp8 = has_fp8(model)
        fp8_weights = fold_fp8_weights(model)  # no fp8 kernels: fp8-grid weights as float32 (exact)
        self.session_bytes = model.SerializeToString() if self.uint8_weights or fp8_weights else qdq_bytes
        so = self._session_options(ort)
        fd, opt_path = tempfile.mkstemp(suffix=".onnx")
        os.close(fd)
        so.optimized_model_filepath = opt_path
        try:
            self.session = ort.InferenceSession(
                self.session_bytes, so, providers=["CPUExecutionProvider"], **self._session_kwargs()
            )
            optimized = Path(opt_path).read_bytes()
        except Exception as e:
            raise EngineError(f"ONNX Runtime could not build the engine: {type(e).__name__}: {e}") from e
        finally:
            Path(opt_path).unlink(missing_ok=True)
        self.optimized_bytes = optimized
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(
                f"the model has {len(inputs)} inputs and {len(outputs)} outputs; mixq engines take one input tensor "
                "and return one output tensor (wrap the model to combine them)"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name

    def _session_kwargs(self) -> dict:
        """ORT graph rewrites to leave out: QDQ propagation with ``keep_pools_float``; for graphs with fp8
        layers the rewrites that are wrong for float8 (:data:`.legalize.FP8_UNSAFE_REWRITES`)."""
        disabled = ["QDQPropagationTransformer"] if self.options.keep_pools_float else []
        if self.fp8:
            disabled += FP8_UNSAFE_REWRITES
        return {"disabled_optimizers": disabled} if disabled else {}

    def _session_options(self, ort):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        return so

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        x = self.check_input(x, check_finite).cpu()
        out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
        return torch.from_numpy(out)

    def _owners(self) -> dict[str, str]:
        """``{activation layer: weighted layer}`` for each ReLU/ReLU6 fed directly by a configured conv or
        linear in the Q/DQ model: ORT names a fused Conv+ReLU after the ReLU's output (NCHWc), but the kernel
        is the conv's."""
        if getattr(self, "_owner_map", None) is None:
            import onnx

            g = GraphIndex(onnx.load_from_string(self.qdq_bytes))
            producer = g.producer
            owners = {}
            for node in g.nodes:
                act = layer_of_node(node.name, self.layers)
                if act is None or node.op_type not in ACTIVATION_KERNELS or not node.input:
                    continue
                p = producer.get(node.input[0])
                while p is not None and p.op_type in QDQ_KERNELS:
                    p = producer.get(p.input[0])
                owner = layer_of_node(p.name, self.layers) if p is not None else None
                if owner is not None and self.layers[owner]["op_type"] in WEIGHTED_OP_TYPES:
                    owners[act] = owner
            self._owner_map = owners
        return self._owner_map

    def layer_of_kernel(self, node_name: str, op_type: str) -> str | None:
        """The layer whose kernel an optimized-graph node is, or None for glue (Q/DQ, layout, nodes outside
        every layer). A conv/gemm kernel named after a fused ReLU belongs to the conv."""
        if op_type in GLUE_KERNELS:
            return None
        layer = layer_of_node(node_name, self.layers)
        if layer is not None and op_type not in ACTIVATION_KERNELS:
            layer = self._owners().get(layer, layer)
        return layer

    def placement(self) -> list[LayerPlacement]:
        import onnx

        graph = onnx.load_from_string(self.optimized_bytes).graph
        kernels: dict[str, list[str]] = defaultdict(list)
        qdq: dict[str, int] = defaultdict(int)
        for node in graph.node:
            if node.op_type in QDQ_KERNELS:
                qdq[layer_of_node(node.name, self.layers) or ""] += 1
            layer = self.layer_of_kernel(node.name, node.op_type)
            if layer is not None:
                kernels[layer].append(node.op_type)
        out = []
        for layer, info in self.layers.items():
            ks = tuple(kernels.get(layer, ()))
            if not ks:
                runs_as = "fused"  # no kernel of its own: absorbed by a neighbour (ORT fusions rename nodes)
            elif any(k in INT8_KERNELS for k in ks):
                runs_as = "int8"
            else:
                runs_as = "fp32"
            out.append(
                LayerPlacement(
                    layer, info["op_type"], info["precision"], runs_as, ks, qdq.get(layer, 0), _note(info, runs_as)
                )
            )
        return out

    def unattributed_qdq(self) -> int:
        import onnx

        graph = onnx.load_from_string(self.optimized_bytes).graph
        return sum(1 for n in graph.node if n.op_type in QDQ_KERNELS and layer_of_node(n.name, self.layers) is None)

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        """Per-layer time of the layer's own kernels (as :meth:`placement` lists them): the median over
        ``runs`` (after 3 warm-up runs) of ORT's per-node profile. Q/DQ, layout and every node outside the
        layers are under ``(glue)``; the rows add up to the profiled time of all nodes."""
        import onnxruntime as ort

        runs = max(1, int(runs))
        so = self._session_options(ort)
        so.enable_profiling = True
        with tempfile.TemporaryDirectory() as d:
            so.profile_file_prefix = str(Path(d) / "prof")
            sess = ort.InferenceSession(
                self.session_bytes, so, providers=["CPUExecutionProvider"], **self._session_kwargs()
            )
            feed = {self.input_name: self.check_input(x).cpu().numpy()}
            for _ in range(3 + runs):
                sess.run(None, feed)
            trace = json.loads(Path(sess.end_profiling()).read_text())
        starts = sorted(ev["ts"] for ev in trace if ev.get("cat") == "Session" and ev.get("name") == "model_run")
        samples = LayerSamples(len(starts), keep=runs)  # the trace has the warm-up runs too
        for ev in trace:
            if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
                continue
            op = ev.get("args", {}).get("op_name", "?")
            layer = self.layer_of_kernel(ev["name"][: -len("_kernel_time")], op) or "(glue)"
            samples.add(layer, bisect.bisect_right(starts, ev["ts"]) - 1, float(ev["dur"]), op)
        scale = 1.0 if starts else 1.0 / (3 + runs)  # no run boundaries in the trace: the mean over all runs
        return samples.layer_times(scale)

    def members(self) -> dict[str, bytes]:
        # The canonical int8 model only: the layout for the CPU is re-decided on load.
        options = {
            "threads": self.options.threads,
            "keep_pools_float": self.options.keep_pools_float,
            "uint8_weights": self.options.uint8_weights,
        }
        return {"model.onnx": self.qdq_bytes, "options.json": json.dumps(options).encode()}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    package = "onnxruntime"
    device = "cpu"
    precisions = frozenset({"fp32", "int8"})  # fp16 runs fp32 (no fast fp16 kernels on CPU)
    emulated = frozenset({"fp8"})  # fp8 Q/DQ kept, the layer computed in fp32 (exact, slower than fp32)

    def legalize(self, model, layers: dict, options: BuildOptions) -> Legalized:
        """See :mod:`.legalize`: conv outputs ORT needs quantized are calibrated on ``options.calibration_data``
        when given. The weight layout for the CPU is decided where the engine is created."""
        import onnx

        if not (options.calibration_data and float_output_convs(model)):
            return Legalized(model, layers)
        legal = onnx.ModelProto()
        legal.CopyFrom(model)
        layers = copy_layers(layers)
        for layer in quantize_conv_outputs(legal, layers, options.calibration_data):
            layers[layer][LEGALIZED_KEY] = len(options.calibration_data)
        return Legalized(legal, layers)

    def build_legal(self, legal: Legalized, input_shape, options: BuildOptions) -> OnnxRuntimeEngine:
        return OnnxRuntimeEngine(legal.model.SerializeToString(), input_shape, legal.layers, options)

    def engine_from_file(self, manifest, members, input_shape, layers) -> OnnxRuntimeEngine:
        opts = json.loads(members["options.json"])
        # Files from before the layout moved to load time stored the build machine's decision, with an
        # optimized.onnx member: decide again here.
        uint8 = None if "optimized.onnx" in members else opts["uint8_weights"]
        options = BuildOptions(threads=opts["threads"], keep_pools_float=opts["keep_pools_float"], uint8_weights=uint8)
        return OnnxRuntimeEngine(members["model.onnx"], input_shape, layers, options)


register_backend("onnxruntime", OnnxRuntimeBackend)
