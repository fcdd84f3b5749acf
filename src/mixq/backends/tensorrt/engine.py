"""TensorRT backend for TensorRT 10.12 to 11.x: a strongly typed network built from the legalized Q/DQ ONNX,
run through torch CUDA tensors.

Strong typing is the only mode in TensorRT 11 and was opt-in from 10.12, where weak typing (builder
precision flags, per-layer precision) was deprecated; TensorRT 11 removed it (release notes 10.12.0,
"Weak typing APIs deprecated"; migration guide 10.x -> 11.x, "Strongly Typed Networks Are Now Required").
So precision lives in the graph: int8 in Q/DQ nodes, fp16 in Cast nodes and float16 weights
(:mod:`.legalize`), and the builder gets no precision flag at all (TF32 is cleared, so fp32 layers
are fp32; that flag is not a weak-typing one and stays in TensorRT 11). The network creation flag
``STRONGLY_TYPED`` is passed on 10.x only; on 11 it is deprecated and ignored (every network is strongly
typed).

Runs on CPU (tested there): legalization, :func:`~.check.check`, the build plan
(:func:`plan_network`), batch chunking, the profile check, dtype mapping and the inspector/profiler parsing
(:mod:`.inspect`). Needs TensorRT and a GPU (``tests/gpu/test_tensorrt_engine.py``): parsing,
building, running, and reading the inspector and profiler of a real engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..base import (
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    Legalized,
    check_fp8_support,
    copy_layers,
    layer_of_node,
    register_backend,
)
from .check import check
from .inspect import layer_times, parse_engine_information, placement
from .legalize import NOTES_KEY, legalize

__all__ = [
    "TensorRTBackend",
    "TensorRTEngine",
    "NetworkPlan",
    "plan_network",
    "batch_chunks",
    "check_profile_shape",
    "torch_dtype",
    "SUPPORTED_VERSIONS",
    "INSTALL_HINT",
]

SUPPORTED_VERSIONS = ((10, 12), (12, 0))  # [min, max): TensorRT 10.12 up to any 11.x
INSTALL_HINT = "pip install 'mixq[tensorrt]' (tensorrt>=10.12,<12)"
WARMUP_RUNS = 3

# TensorRT DataType names -> torch dtypes (nptype has no bfloat16).
_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class NetworkPlan:
    """Everything the builder is told, decided without TensorRT: no precision flags (strong typing)."""

    input_name: str
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max shapes
    creation_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    workspace_bytes: int


def plan_network(model, input_shape, options: BuildOptions, tensorrt_major: int) -> NetworkPlan:
    """The optimization profile for the dynamic batch (min 1, opt ``options.opt_batch``, max
    ``options.max_batch``) and the creation flags for ``tensorrt_major`` (``STRONGLY_TYPED`` on 10.x only)."""
    if options.max_batch < 1 or not 1 <= options.opt_batch <= options.max_batch:
        raise EngineError(f"need 1 <= opt_batch ({options.opt_batch}) <= max_batch ({options.max_batch})")
    rest = tuple(int(d) for d in input_shape[1:])
    profile = ((1, *rest), (options.opt_batch, *rest), (options.max_batch, *rest))
    flags = ("STRONGLY_TYPED",) if tensorrt_major == 10 else ()
    return NetworkPlan(model.graph.input[0].name, profile, flags, options.workspace_bytes)


def batch_chunks(batch: int, max_batch: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` slices of at most ``max_batch`` covering ``batch`` rows (NNI feeds 1000-image
    batches to engines built for 32)."""
    if max_batch < 1:
        raise EngineError(f"the engine's profile allows no batch (max {max_batch})")
    return [(i, min(i + max_batch, batch)) for i in range(0, batch, max_batch)]


def check_profile_shape(shape: tuple[int, ...], profile) -> None:
    """A clear error when ``shape`` lies outside the optimization profile ``(min, opt, max)``."""
    lo, _, hi = profile
    if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
        raise EngineError(
            f"input shape {tuple(shape)} is outside the engine's optimization profile "
            f"(min {tuple(lo)}, max {tuple(hi)}); rebuild with max_batch/input_shape covering it"
        )


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` name (``FLOAT``, ``HALF``, ...)."""
    if trt_dtype_name not in _TORCH_DTYPES:
        raise EngineError(f"TensorRT tensor type {trt_dtype_name} has no torch equivalent for mixq's I/O")
    return _TORCH_DTYPES[trt_dtype_name]


def _version(text: str) -> tuple[int, int]:
    numbers = [int(re.match(r"\d*", p).group() or 0) for p in [*text.split("."), "0", "0"][:2]]
    return numbers[0], numbers[1]


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            f"backend 'tensorrt' needs TensorRT 10.12 to 11.x ({INSTALL_HINT}) and an NVIDIA GPU; "
            "use backend='onnxruntime' (CPU) instead"
        ) from e
    version = _version(getattr(trt, "__version__", "0.0"))
    if not SUPPORTED_VERSIONS[0] <= version < SUPPORTED_VERSIONS[1]:
        raise EngineError(
            f"TensorRT {trt.__version__} is installed; mixq builds strongly typed networks on TensorRT 10.12 to "
            f"11.x ({INSTALL_HINT})"
        )
    return trt


def _graph_ops(onnx_bytes: bytes) -> dict[str, str]:
    if not onnx_bytes:
        return {}
    import onnx

    return {n.name: n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, plan: bytes, onnx_bytes: bytes, input_shape, layers: dict):
        """``plan``: the serialized engine; ``onnx_bytes``: the legalized graph it was built from (read for
        the placement report)."""
        super().__init__(input_shape, layers, max_batch=None)  # larger batches run in chunks
        trt = _trt()
        self.plan = plan
        self.onnx_bytes = onnx_bytes
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError("TensorRT could not deserialize the plan (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(
                f"the engine has {len(inputs)} inputs and {len(outputs)} outputs; mixq engines take one input "
                "tensor and return one output tensor"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input_name).name)
        self.output_dtype = torch_dtype(self.engine.get_tensor_dtype(self.output_name).name)
        if self.input_dtype != torch.float32:
            raise EngineError(f"the engine's input is {self.input_dtype}; mixq feeds float32")
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile_shapes = (tuple(lo), tuple(opt), tuple(hi))
        self.profile_max_batch = int(hi[0])
        self._profiler = None

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        """Output of ``x`` as a CPU float32 tensor; batches above the profile's max run in chunks."""
        x = self.check_input(x, check_finite)
        outs = [self._run(x[a:b]) for a, b in batch_chunks(x.shape[0], self.profile_max_batch)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        check_profile_shape(tuple(x.shape), self.profile_shapes)
        x = x.to("cuda", non_blocking=True).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise EngineError(
                f"TensorRT refused input shape {tuple(x.shape)} (profile min {self.profile_shapes[0]}, "
                f"max {self.profile_shapes[2]})"
            )
        out = torch.empty(
            tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=self.output_dtype
        )
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the TensorRT log above)")
        stream.synchronize()
        return out.to(torch.float32).cpu()

    def engine_information(self) -> str:
        """The inspector's JSON for this engine (built with detailed profiling verbosity)."""
        trt = _trt()
        inspector = self.engine.create_engine_inspector()
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)

    def placement(self) -> list[LayerPlacement]:
        layers = parse_engine_information(self.engine_information())
        return placement(layers, _graph_ops(self.onnx_bytes), self.layers)

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        """Per-layer time: the median over ``runs`` (after 3 warm-up runs without the profiler) of the
        times an ``IProfiler`` reports per engine layer, attributed to mixq layers through the inspector."""
        trt = _trt()
        runs = max(1, int(runs))
        x = self.check_input(x)[: self.profile_max_batch]

        class _Profiler(trt.IProfiler):
            def __init__(self):
                trt.IProfiler.__init__(self)
                self.current: dict[str, float] = {}

            def report_layer_time(self, layer_name, ms):
                self.current[layer_name] = self.current.get(layer_name, 0.0) + ms

        for _ in range(WARMUP_RUNS):
            self._run(x)
        profiler = _Profiler()
        self.context.profiler = profiler
        per_run = []
        try:
            for _ in range(runs):
                profiler.current = {}
                self._run(x)
                per_run.append(profiler.current)
        finally:
            self.context.profiler = None
        layers = parse_engine_information(self.engine_information())
        return layer_times(per_run, layers, _graph_ops(self.onnx_bytes), self.layers)

    def members(self) -> dict[str, bytes]:
        return {"engine.plan": bytes(self.plan), "model.onnx": self.onnx_bytes}


class TensorRTBackend(Backend):
    name = "tensorrt"
    package = "tensorrt"
    device = "cuda"
    precisions = frozenset({"fp32", "fp16", "int8", "fp8"})

    def is_available(self) -> bool:
        return super().is_available() and torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        return (
            f"backend 'tensorrt' needs TensorRT 10.12 to 11.x ({INSTALL_HINT}) and a CUDA GPU; "
            "use backend='auto' (the default: the fastest engine this machine has) instead"
        )

    def build(self, qdq, input_shape, options: BuildOptions) -> TensorRTEngine:
        """:meth:`legalize`, then parse and build a strongly typed network (:meth:`build_legal`). fp8 layers need
        a GPU of compute capability 8.9 or newer (:func:`..base.check_fp8_support`, checked first)."""
        fp8 = next((name for name, info in qdq.layers.items() if info.get("precision") == "fp8"), None)
        if fp8 is not None and torch.cuda.is_available():
            check_fp8_support(f"layer {fp8!r}", torch.device("cuda", torch.cuda.current_device()))
        return super().build(qdq, input_shape, options)

    def legalize(self, model, layers: dict, options: BuildOptions) -> Legalized:
        """:func:`.legalize.legalize`, then :func:`.check`: a rule TensorRT would reject is an error here, a
        placement rule a note on its layer. Needs no TensorRT."""
        legal = legalize(model, layers, options.calibration_data)
        problems = check(legal.model)
        rejected = [p for p in problems if p.kind == "rejected"]
        if rejected:
            shown = "; ".join(str(p) for p in rejected[:4]) + (
                f"; and {len(rejected) - 4} more" if len(rejected) > 4 else ""
            )
            raise EngineError(f"TensorRT would reject this Q/DQ graph after legalization: {shown}")
        return Legalized(legal.model, _with_placement_notes(legal.layers, problems))

    def build_legal(self, legal: Legalized, input_shape, options: BuildOptions) -> TensorRTEngine:
        layers, onnx_bytes = legal.layers, legal.model.SerializeToString()
        trt = _trt()
        plan = plan_network(legal.model, input_shape, options, _version(trt.__version__)[0])
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        for flag in plan.creation_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse the legalized Q/DQ ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        # fp32 layers compute in fp32: TF32 (on by default; kept in TensorRT 11, orthogonal to typing) is off.
        config.clear_flag(trt.BuilderFlag.TF32)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer types and ONNX names in the inspector
        profile = builder.create_optimization_profile()
        profile.set_shape(plan.input_name, *plan.profile)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError("TensorRT failed to build the engine (see the TensorRT log above)")
        return TensorRTEngine(bytes(serialized), onnx_bytes, input_shape, layers)

    def engine_from_file(self, manifest, members, input_shape, layers) -> TensorRTEngine:
        if "engine.plan" not in members:
            raise EngineError("the engine file has no engine.plan member")
        return TensorRTEngine(members["engine.plan"], members.get("model.onnx", b""), input_shape, layers)


def _with_placement_notes(layers: dict, problems) -> dict:
    """``layers`` with each remaining placement problem noted on the layer of its node."""
    out = copy_layers(layers)
    for p in problems:
        layer = layer_of_node(p.node, out)
        note = f"TensorRT placement [{p.rule}]: {p.detail}"
        if layer is not None and note not in out[layer].setdefault(NOTES_KEY, []):
            out[layer][NOTES_KEY].append(note)
    return out


register_backend("tensorrt", TensorRTBackend)
