"""TensorRT 10+ backend: explicit quantization from the same Q/DQ ONNX, inference through torch CUDA tensors.

What runs without TensorRT (and is tested on CPU): :func:`plan_network` — the flags, the optimization profile
for the dynamic batch, and the per-layer precision constraints derived from the Q/DQ model. What needs
TensorRT and a GPU: :meth:`TensorRTBackend.build` (parse, build the serialized plan), running it, and reading
placement from the engine inspector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .base import (
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    layer_of_node,
    read_engine_file,
    register_backend,
)

__all__ = ["TensorRTBackend", "TensorRTEngine", "NetworkPlan", "plan_network"]


@dataclass(frozen=True)
class NetworkPlan:
    """Everything the builder is told, decided without TensorRT."""

    input_name: str
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max shapes
    flags: tuple[str, ...]  # BuilderFlag names
    layer_precision: dict[str, str]  # ONNX node name -> "fp16" | "fp32" (int8 comes from Q/DQ)
    workspace_bytes: int


def plan_network(qdq, input_shape, options: BuildOptions) -> NetworkPlan:
    """Flags, profile and per-node precision constraints for ``qdq`` (a :class:`QDQExport`).

    Explicit quantization: INT8 comes from the Q/DQ nodes (the INT8 flag lets TensorRT use int8 kernels
    for them). FP16 is enabled when any layer asks for 16 bits or ``extra_layer_bits`` was 16; then each
    layer's nodes get their requested precision, and ``options.strict_precision`` makes TensorRT obey it rather than
    prefer it.
    """
    if options.max_batch < 1 or not 1 <= options.opt_batch <= options.max_batch:
        raise EngineError(f"need 1 <= opt_batch ({options.opt_batch}) <= max_batch ({options.max_batch})")
    rest = tuple(int(d) for d in input_shape[1:])
    profile = ((1, *rest), (options.opt_batch, *rest), (options.max_batch, *rest))
    precisions = {}
    for node in qdq.model.graph.node:
        layer = layer_of_node(node.name, qdq.layers)
        if layer is not None and qdq.layers[layer]["precision"] in ("fp16", "fp32"):
            precisions[node.name] = qdq.layers[layer]["precision"]
    flags = ["INT8"]
    if any(p == "fp16" for p in precisions.values()):
        flags.append("FP16")
        flags.append("OBEY_PRECISION_CONSTRAINTS" if options.strict_precision else "PREFER_PRECISION_CONSTRAINTS")
    return NetworkPlan(qdq.model.graph.input[0].name, profile, tuple(flags), precisions, options.workspace_bytes)


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            "backend 'tensorrt' needs TensorRT 10+ (pip install tensorrt) and an NVIDIA GPU; "
            "use backend='onnxruntime' (CPU) instead"
        ) from e
    return trt


class TensorRTEngine(Engine):
    backend = "tensorrt"

    def __init__(self, plan: bytes, input_shape, layers: dict, max_batch: int):
        super().__init__(input_shape, layers, max_batch=max_batch)
        trt = _trt()
        self.plan = plan
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError("TensorRT could not deserialize the plan (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        x = self.check_input(x, check_finite).to("cuda", non_blocking=True)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu()

    def placement(self) -> list[LayerPlacement]:
        trt = _trt()
        info = json.loads(self.engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        kernels: dict[str, list[str]] = {}
        dtypes: dict[str, set] = {}
        for layer in info.get("Layers", []):
            if not isinstance(layer, dict):
                continue
            fmt = " ".join(
                str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) + layer.get("Outputs", [])
            )
            for part in str(layer.get("Name", "")).split(" + "):
                owner = layer_of_node(part.strip(), self.layers)
                if owner is not None:
                    kernels.setdefault(owner, []).append(str(layer.get("LayerType", "?")))
                    dtypes.setdefault(owner, set()).update(
                        k for k, tag in (("int8", "Int8"), ("fp16", "Half"), ("fp32", "Float")) if tag in fmt
                    )
        out = []
        for name, meta in self.layers.items():
            d = dtypes.get(name, set())
            runs_as = next((p for p in ("int8", "fp16", "fp32") if p in d), "fused")
            out.append(
                LayerPlacement(name, meta["op_type"], meta["precision"], runs_as, tuple(kernels.get(name, ())), 0)
            )
        return out

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        trt = _trt()

        class _Profiler(trt.IProfiler):
            def __init__(self):
                super().__init__()
                self.times: dict[str, float] = {}

            def report_layer_time(self, layer_name, ms):
                self.times[layer_name] = self.times.get(layer_name, 0.0) + ms

        profiler = _Profiler()
        self.context.profiler = profiler
        try:
            for _ in range(runs):
                self.run(x)
        finally:
            self.context.profiler = None
        per_layer: dict[str, float] = {}
        for name, ms in profiler.times.items():
            owner = layer_of_node(name.split(" + ")[0], self.layers) or "(glue)"
            per_layer[owner] = per_layer.get(owner, 0.0) + ms * 1000 / runs
        return [LayerTime(k, v) for k, v in sorted(per_layer.items(), key=lambda kv: -kv[1])]

    def members(self) -> dict[str, bytes]:
        return {"engine.plan": bytes(self.plan)}


class TensorRTBackend(Backend):
    name = "tensorrt"
    package = "tensorrt"

    def is_available(self) -> bool:
        return super().is_available() and torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        return (
            "backend 'tensorrt' needs TensorRT 10+ (pip install tensorrt) and a CUDA GPU; "
            "use backend='onnxruntime' (CPU, the default) instead"
        )

    def build(self, qdq, input_shape, options: BuildOptions) -> TensorRTEngine:
        trt = _trt()
        plan = plan_network(qdq, input_shape, options)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(qdq.model.SerializeToString()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse the Q/DQ ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        for flag in plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            precision = plan.layer_precision.get(layer.name)
            if precision is not None:
                layer.precision = trt.float16 if precision == "fp16" else trt.float32
        profile = builder.create_optimization_profile()
        profile.set_shape(plan.input_name, *plan.profile)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError("TensorRT failed to build the engine (see the TensorRT log above)")
        return TensorRTEngine(bytes(serialized), input_shape, qdq.layers, plan.profile[2][0])

    def load(self, path) -> TensorRTEngine:
        manifest, members = read_engine_file(path, self.name)
        return TensorRTEngine(
            members["engine.plan"], tuple(manifest["input_shape"]), manifest["layers"], manifest["max_batch"]
        )


register_backend("tensorrt", TensorRTBackend)
