"""Native GPU backend ``cuda`` (torch + Triton): the Q/DQ graph lowered to fused int8 Triton kernels
(:mod:`.lower`, :mod:`.kernels`), replayed as one CUDA graph per batch size.

- int8 convs/linears: int8 tensor-core GEMMs with int32 accumulation and the whole epilogue fused (scale,
  bias, residual add or the shortcut conv as a second GEMM, ReLU/clip, requantization), so activations stay
  int8 channels-last between quantized layers; the network input is quantized as the first conv loads it.
- fp8 layers (input and weight through FLOAT8E4M3FN Q/DQ): e4m3 tensor-core GEMMs (fp32 accumulation) with A
  read straight from the e4m3 NHWC activation and the same fused epilogue, activations staying e4m3
  channels-last between fp8 layers; pools, requantization (fp8 <-> fp8, fp8 <-> int8), quantize and
  dequantize on e4m3 tensors too.
- fp16 layers: the same kernel with fp16 operands (fp32 accumulation).
- float layers run as they are in torch (fp32 with TF32 off).
- Kernel tile configs are chosen per layer shape at build time by timing candidates on the GPU (at the
  optimization batch) and stored in the engine file, so loading needs no tuning.

The engine file holds the Q/DQ ONNX model and the kernel configs; the model is lowered again where it
is loaded (the lowering is deterministic), so the file carries no compiled code.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ...spec import TWO_INPUT_OP_TYPES
from ..base import (
    FLOAT_BIAS_NOTE,
    Backend,
    BuildOptions,
    Engine,
    EngineError,
    LayerPlacement,
    LayerTime,
    Legalized,
    check_fp8_support,
    layer_of_node,
    register_backend,
)
from .library_gemm import LibraryGemm, ScaledMMRunner, library_gemm_fits
from .runners import (
    STORED,
    ConvRunner,
    PoolRunner,
    QuantizeRunner,
    RequantRunner,
    TorchRunner,
    _kernels,
    candidate_configs,
    default_config,
    static_float_strides,
)

__all__ = ["CudaBackend", "CudaEngine", "build_engine", "candidate_configs", "default_config"]

MAX_GRAPHS = 8  # CUDA graphs kept (one per batch size, least recently used dropped)
KERNELS_MEMBER = "kernels.json"


# ------------------------------------------------------------------------------------------ engine


@dataclass
class _Graph:
    """One captured batch size: the graph reads ``x`` and writes ``out`` (static buffers) and ``finite`` (the
    input had no NaN/inf, computed inside the graph, so checking it costs no launch and no extra sync).
    ``staging``: the pinned host buffer CPU inputs go through (made on first use); ``staged`` records when its
    copy to the device finished, so the next call does not overwrite it while the copy is in flight."""

    graph: object
    x: torch.Tensor
    out: torch.Tensor
    finite: torch.Tensor
    staging: torch.Tensor | None = None
    staged: object = None


def _device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - the engine cannot exist without triton
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = "none (Triton interpreter on the CPU)"
    return info


class CudaEngine(Engine):
    backend = "cuda"

    def __init__(self, qdq_bytes: bytes, input_shape, layers: dict, kernels: dict | None, device, opt_batch: int,
                 calibration_data=(), float_glue: str = "fp32"):  # fmt: skip
        """``kernels``: stored tile configs ``{"configs": {node: config}}`` from an engine file (with the float
        glue precision it was built with), or None to tune them here (on a GPU; the CPU interpreter takes the
        default configs). ``float_glue``: see :func:`.lower.lower`."""
        import onnx

        from .lower import lower

        super().__init__(input_shape, layers, max_batch=None)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N": inputs compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.qdq_bytes = qdq_bytes
        try:
            self.float_glue = (kernels or {}).get("float_glue", float_glue)
            self.plan = lower(onnx.load_from_string(qdq_bytes), layers, self.float_glue)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"the cuda backend could not lower the Q/DQ model: {type(e).__name__}: {e}") from e
        fp8 = next((op.node for op in self.plan.ops if getattr(op, "mode", None) == "fp8"), None)
        check_fp8_support(None if fp8 is None else f"node {fp8!r}", self.device)  # before any compiling
        self._views: dict[int, list[int]] = {}
        for view, base in self.plan.aliases.items():
            self._views.setdefault(base, []).append(view)
        self._lock = threading.Lock()
        self._graphs: OrderedDict[int, _Graph] = OrderedDict()
        stored = (kernels or {}).get("configs", {})
        tune = kernels is None and self.device.type == "cuda"
        self.tuning: dict[str, dict] = {}
        self.runners = self._make_runners(stored, tune, opt_batch, calibration_data)
        self.build_info = (kernels or {}).get("build") or {**_device_info(self.device), "tuned_at_batch": opt_batch}

    # ---------------------------------------------------------------- building
    def _precompile(self, stored: dict, tune: bool, batch: int) -> None:
        """Compile every conv kernel the build will use in parallel worker processes (see .compile)."""
        from .compile import precompile

        k = _kernels()
        jobs = []
        for op in self.plan.ops:
            if op.kind != "conv":
                continue
            floats = [t for t in (op.x, op.res[0] if op.res else None) if t is not None]
            floats = [t for t in floats if self.plan.tensors[t].dtype not in STORED]
            strides = {t: static_float_strides(self.plan, t) for t in floats}
            if any(v is None for v in strides.values()):
                continue  # an input torch produces: its strides are known only when it runs
            if op.node in stored:
                if "library" in stored[op.node]:
                    continue  # a library GEMM: nothing of Triton's to compile
                configs = [k.KernelConfig.from_dict(stored[op.node])]
            else:
                configs = candidate_configs(op) if tune else [default_config(op)]
            jobs += [(op, c, strides) for c in configs]
        if jobs:
            precompile(jobs, self.plan.tensors, batch)

    def _make_runners(self, stored: dict, tune: bool, opt_batch: int, samples) -> list:
        runners = []
        env = {}
        if self.device.type == "cuda":
            self._precompile(stored, tune, opt_batch)
        if tune:
            env[0] = self._sample_input(opt_batch, samples)
        cache: dict[tuple, object] = {}
        for op in self.plan.ops:
            if op.kind == "conv":
                if op.node in stored:
                    config = _stored_config(stored[op.node])
                elif tune:
                    config = self._tune(op, env, cache)
                else:
                    config = default_config(op)
                runner = self._gemm_runner(op, config)
            else:
                runner = {"pool": PoolRunner, "requant": RequantRunner, "quantize": QuantizeRunner,
                          "torch": TorchRunner}[op.kind](op, self.plan, self.device)  # fmt: skip
            if tune:
                with torch.no_grad(), _no_tf32():
                    self._step(runner, env)
            runners.append(runner)
        return runners

    def _sample_input(self, batch: int, samples) -> torch.Tensor:
        rows = [torch.as_tensor(np.asarray(s, np.float32)) for s in samples] if samples else []
        x = torch.cat(rows)[:batch] if rows else torch.empty(0)
        if x.shape[0] < batch:  # fresh normal values where the sample data runs out (never zeros)
            extra = torch.randn(batch - x.shape[0], *self.input_shape[1:])
            x = torch.cat([x.reshape(-1, *self.input_shape[1:]), extra])
        return x.reshape(batch, *self.input_shape[1:]).to(self.device)

    def _tune(self, op, env: dict, cache: dict):
        """The fastest candidate config for this layer at the tuning batch (:func:`time_in_graph`: GPU time
        only, so host launch overhead does not decide between small kernels); layers of the same shape share
        the result (same epilogue too: a residual changed the best tile of ResNet-18's layer1, gpu-notes.md note 7)."""
        key = (op.mode, op.x_float, op.sc is not None, tuple(sorted(op.geometry.items())), _epilogue(op))
        if key in cache:
            return cache[key]
        timings = {}
        candidates = candidate_configs(op)
        if self.float_glue == "fp16" and library_gemm_fits(op) and os.environ.get("MIXQ_CUDA_LIBRARY_GEMM") != "0":
            candidates.append(LibraryGemm())  # cuBLASLt, bf16 out: only in fp16-glue builds (.library_gemm)
        for config in candidates:
            try:
                runner = self._gemm_runner(op, config)
                scratch = dict(env)
                with torch.no_grad():
                    runner(scratch)  # compile
                    us = time_in_graph(lambda r=runner, e=scratch: r(e), runs=10, repeats=3)
            except Exception as e:  # a config the compiler rejects (shared memory, registers): skip it
                timings[str(config)] = f"failed: {type(e).__name__}"
                continue
            timings[str(config)] = round(float(us), 2)
        ok = {c: t for c, t in timings.items() if isinstance(t, float)}
        if not ok:
            raise EngineError(f"layer {op.node!r}: no kernel config compiled on this GPU: {timings}")
        best = min(ok, key=ok.get)
        config = next(c for c in candidates if str(c) == best)
        self.tuning[op.node] = {"us": timings, "chosen": best}
        cache[key] = config
        return config

    def _gemm_runner(self, op, config):
        if isinstance(config, LibraryGemm):
            return ScaledMMRunner(op, self.plan, self.device, config)
        return ConvRunner(op, self.plan, self.device, config)

    # ---------------------------------------------------------------- running
    def _step(self, runner, env: dict) -> None:
        """Run one op, then publish the flattened views of what it wrote (same storage, [N, F])."""
        runner(env)
        for tid in runner.outputs():
            for view in self._views.get(tid, ()):
                env[view] = env[tid].reshape(env[tid].shape[0], -1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {0: x}
        for runner in self.runners:
            self._step(runner, env)
        return env[self.plan.output]

    def _graph(self, batch: int) -> _Graph:
        g = self._graphs.get(batch)
        if g is not None:
            self._graphs.move_to_end(batch)
            return g
        x = torch.randn(batch, *self.input_shape[1:], device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad(), _no_tf32():
            for _ in range(2):  # compile every kernel for these shapes, and warm the allocator
                self._forward(x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), _no_tf32():
            finite = torch.isfinite(x).all()
            out = self._forward(x)
        g = _Graph(graph, x, out, finite)
        self._graphs[batch] = g
        if len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return g

    def _stage(self, g: _Graph, x: torch.Tensor) -> None:
        """Copy a host input into the graph's input buffer through pinned memory (asynchronously)."""
        if g.staging is None:
            g.staging = torch.empty(g.x.shape, dtype=g.x.dtype, pin_memory=True)
            g.staged = torch.cuda.Event()
        else:
            g.staged.synchronize()  # the previous call's copy out of the staging buffer has finished
        g.staging.copy_(x)
        g.x.copy_(g.staging, non_blocking=True)
        g.staged.record()

    def run_device(self, x, check_finite: bool = True) -> torch.Tensor:
        """Run on the engine's device and return the output there (a CUDA tensor on a GPU). On a GPU this
        replays the batch size's CUDA graph (captured on first use): an input already on the engine's GPU is
        copied device-to-device into the graph's input buffer (no host round trip), a CPU input through a
        pinned staging buffer. ``check_finite`` reads the graph's own finiteness flag after the replay (one
        synchronization, which a caller reading the output needs anyway); without it nothing waits for the GPU."""
        if self.device.type != "cuda":
            x = self.check_input(x, check_finite).to(self.device)
            with torch.no_grad():
                return self._forward(x).clone()
        x = self.check_input(x, check_finite=False)
        with self._lock:
            g = self._graph(x.shape[0])
            if x.device == self.device:
                g.x.copy_(x)
            elif x.device.type == "cpu":
                self._stage(g, x)
            else:
                g.x.copy_(x.to(self.device))
            g.graph.replay()
            out = g.out.clone()
            if check_finite and not bool(g.finite):
                raise EngineError("input contains NaN or infinite values")
        return out

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        """float32 output: on the engine's GPU for an input already there (nothing copied back to the host),
        else a CPU tensor."""
        out = self.run_device(x, check_finite).float()
        if isinstance(x, torch.Tensor) and x.device == self.device:
            return out
        return out.cpu()

    # ---------------------------------------------------------------- report
    def _op_layer(self, op) -> str | None:
        return layer_of_node(op.node, self.layers)

    def placement(self) -> list[LayerPlacement]:
        kernels: dict[str, list[str]] = {}
        precisions: dict[str, set[str]] = {}
        gemms: dict[str, str] = {}  # layer -> the precision its conv/linear kernel runs in
        fused_into: dict[str, str] = {}
        acc32: set[str] = set()  # layers whose fp8 GEMM accumulates in fp32
        library: set[str] = set()  # layers run by a library GEMM (cuBLASLt)
        for runner in self.runners:
            op = runner.op
            owner = self._op_layer(op)
            if owner is None:
                continue
            if isinstance(runner, ConvRunner) and runner.dot == _kernels().DOT_FP8_ACC32:
                acc32.add(owner)
            if isinstance(runner, ScaledMMRunner):
                library.add(owner)
            kernels.setdefault(owner, []).append(runner.describe())
            precisions.setdefault(owner, set()).add(_runs_as(runner))
            gemm = isinstance(runner, ConvRunner | ScaledMMRunner)
            if gemm or (isinstance(runner, TorchRunner) and op.op in _GEMM_OPS):
                gemms.setdefault(owner, _runs_as(runner))
            for node in op.absorbed:
                other = layer_of_node(node, self.layers)
                if other is not None and other != owner:
                    fused_into.setdefault(other, owner)
        rows = []
        for layer, info in self.layers.items():
            requested = info["precision"]
            ks = tuple(kernels.get(layer, ()))
            p = precisions.get(layer, set())
            if ks:
                runs_as = gemms.get(layer) or next((r for r in ("int8", "fp8", "fp16", "fp32") if r in p), "fp32")
                note = _note(info, runs_as, self.plan.notes.get(layer), layer in acc32)
                if layer in library and runs_as == "fp8":
                    note = FP8_LIBRARY_NOTE
            elif layer in fused_into:
                runs_as, note = "fused", f"no kernel of its own: fused into {fused_into[layer]}"
            else:
                runs_as, note = "fused", "no kernel of its own (folded at export or a no-op here)"
            rows.append(LayerPlacement(layer, info["op_type"], requested, runs_as, ks, 0, note))
        return rows

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        """Per-layer time: each op captured ``runs`` times in a row in one CUDA graph, replayed between CUDA
        events (no launch gaps), the median of 5 replays divided by ``runs``; ops outside every layer are
        ``(glue)``. On the CPU interpreter: wall time of each op."""
        x = self.check_input(x).to(self.device)
        env = {0: x}
        per_op = []
        with torch.no_grad(), _no_tf32():
            for runner in self.runners:
                per_op.append(self._time_op(runner, env, max(1, int(runs))))
        totals: dict[str, float] = {}
        names: dict[str, set[str]] = {}
        for runner, us in zip(self.runners, per_op, strict=True):
            layer = self._op_layer(runner.op) or "(glue)"
            totals[layer] = totals.get(layer, 0.0) + us
            names.setdefault(layer, set()).add(runner.describe().split(" [")[0])
        rows = [LayerTime(k, v, tuple(sorted(names[k]))) for k, v in totals.items()]
        return sorted(rows, key=lambda r: -r.microseconds)

    def _time_op(self, runner, env: dict, runs: int) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            self._step(runner, env)
            return (time.perf_counter() - start) * 1e6
        self._step(runner, env)  # compile and produce the input of the next op
        scratch = dict(env)
        return time_in_graph(lambda: runner(scratch), runs)

    def members(self) -> dict[str, bytes]:
        configs = {r.op.node: r.config.to_dict() for r in self.runners if isinstance(r, ConvRunner | ScaledMMRunner)}
        kernels = {"configs": configs, "build": self.build_info, "tuning": self.tuning, "float_glue": self.float_glue}
        return {"model.onnx": self.qdq_bytes, KERNELS_MEMBER: json.dumps(kernels, indent=1).encode()}


_GEMM_OPS = ("Conv", "Gemm", "MatMul")


def _stored_config(d: dict):
    return LibraryGemm(d["library"]) if "library" in d else _kernels().KernelConfig.from_dict(d)


def _runs_as(runner) -> str:
    if isinstance(runner, ConvRunner | ScaledMMRunner):
        return runner.op.mode
    if isinstance(runner, PoolRunner | RequantRunner | QuantizeRunner):
        grid = runner.op.out_grid or runner.op.grid
        return grid.dtype
    if runner.op.op == "Dequantize":
        return "glue"
    return runner.op.dtype


# benchmarks/results/fp8-accumulation-h100.log
FP8_ACCUMULATION_NOTE = (
    "fp8 tensor cores accumulate with reduced precision (about 11 bits measured on an H100), so sums can differ "
    "from the fp32 fake-quant model's"
)
FP8_ACC32_NOTE = (
    "fp8 tensor cores, each BK-long chunk's sum added to an fp32 accumulator (the tensor cores alone keep about "
    "11 bits over the whole reduction)"
)


FP8_LIBRARY_NOTE = (
    "fp8 tensor cores through cuBLASLt (torch._scaled_mm), partial sums promoted to fp32, bf16 output; chosen over "
    "the Triton kernel by timing at build"
)


ATTENTION_MATMUL_NOTE = (
    "no 8-bit kernel for a matmul of two activations here: its operands are quantized and dequantized (the fake-quant "
    "model's values) and it runs in float, which also keeps the attention from the fused SDPA kernel; leave MatMul "
    "out of the config for cuda engines"
)


def _note(info: dict, runs_as: str, why_not_fp8: str | None = None, fp8_acc32: bool = False) -> str:
    """The placement report's note for a layer; ``why_not_fp8``: the lowering's reason (``Plan.notes``)."""
    requested = info["precision"]
    if requested in ("int8", "fp8") and runs_as == "fp32" and info.get("op_type") in TWO_INPUT_OP_TYPES:
        return ATTENTION_MATMUL_NOTE
    if requested == "int8" and runs_as == "fp32":
        if info.get("float_bias"):
            return FLOAT_BIAS_NOTE
        return (
            "asked int8, runs float: the config does not quantize both its input and weight (or the op/pattern "
            "has no int8 kernel here)"
        )
    if requested == "fp8" and runs_as != "fp8":
        why = why_not_fp8 or "its input and weight do not both come through fp8 (FLOAT8E4M3FN) DequantizeLinear"
        return f"asked fp8, runs {runs_as}: {why}"
    if runs_as == "fp8":
        return FP8_ACC32_NOTE if fp8_acc32 else FP8_ACCUMULATION_NOTE
    return ""


def _epilogue(op) -> tuple:
    """What a conv's epilogue reads and writes, beyond its geometry: fake-quant, residual and output kinds."""
    res = None if op.res is None else (op.res[1].dtype if op.res[1] is not None else "float")
    grids = (op.q0, op.out_grid if op.store1 else None, op.out2_grid)
    return (res, op.act is not None, *(None if g is None else g.dtype for g in grids), op.out_dtype)


def time_in_graph(fn, runs: int, repeats: int = 5) -> float:
    """Microseconds per call of ``fn`` (GPU work only): ``runs`` calls captured in one CUDA graph, the graph
    replayed ``repeats`` times between CUDA events, the median divided by ``runs``. ``fn`` must have run once
    already (compiled)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(runs):
            fn()
    graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / runs)
    return statistics.median(samples)


@contextlib.contextmanager
def _no_tf32():
    """Float layers run in true fp32 (torch's convs and matmuls would otherwise use TF32 on Ampere and newer)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def build_engine(qdq, input_shape, options: BuildOptions, device="cuda") -> CudaEngine:
    """Build a CUDA engine (``device="cpu"`` runs the same kernels through Triton's interpreter; set
    ``TRITON_INTERPRET=1`` before Triton is imported: for tests only)."""
    return CudaBackend(device).build(qdq, input_shape, options)


class CudaBackend(Backend):
    name = "cuda"
    package = "triton"
    device = "cuda"
    precisions = frozenset({"fp32", "fp16", "int8", "fp8"})

    def __init__(self, torch_device: str = "cuda"):
        # Where engines built or loaded by this backend run; "cpu" runs the same kernels through Triton's
        # interpreter (tests, with TRITON_INTERPRET=1 set before Triton is imported).
        self.torch_device = torch_device

    def is_available(self) -> bool:
        return super().is_available() and torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        if not super().is_available():
            return "backend 'cuda' needs Triton and a CUDA GPU (pip install 'mixq[cuda]')"
        return "backend 'cuda' needs a CUDA GPU (torch.cuda.is_available() is False here)"

    def build_legal(self, legal: Legalized, input_shape, options: BuildOptions) -> CudaEngine:
        batch = max(1, options.opt_batch)  # no max batch here: every batch size gets its own CUDA graph
        return CudaEngine(legal.model.SerializeToString(), tuple(input_shape), legal.layers, None, self.torch_device,
                          batch, options.calibration_data, options.float_glue)  # fmt: skip

    def strongest_float(self, model, input_shape, layers: dict, options: BuildOptions) -> Engine:
        """``auto``'s float reference on this GPU: the torch model in fp16 channels-last, compiled and
        CUDA-graphed (:class:`.torch_float.TorchFloatEngine`)."""
        from .torch_float import TorchFloatEngine

        try:
            return TorchFloatEngine(model, input_shape, layers, max(1, options.opt_batch))
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"torch fp16 float engine: {type(e).__name__}: {e}") from e

    def engine_from_file(self, manifest, members, input_shape, layers) -> CudaEngine:
        kernels = json.loads(members[KERNELS_MEMBER])  # the tuned kernel choice: no re-tuning on load
        return CudaEngine(members["model.onnx"], input_shape, layers, kernels, self.torch_device, 1)


register_backend("cuda", CudaBackend)
