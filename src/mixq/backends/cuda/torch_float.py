"""The strongest float engine a user could run on the GPU without mixq: the torch model itself in fp16,
channels-last, compiled with ``torch.compile(mode="max-autotune-no-cudagraphs")`` where that works, and
replayed as one CUDA graph per batch size (the input cast to fp16 channels-last inside the graph).

``backend="auto"`` times it beside the quantized engines on a CUDA model, so that "faster than the fastest
float engine" is said against this, not against the cuda backend's exact-fp32 float graph."""

from __future__ import annotations

import copy
import statistics
import threading
import time

import torch

from ..base import Engine, EngineError, LayerPlacement, LayerTime

__all__ = ["TorchFloatEngine"]

COMPILE_MODE = "max-autotune-no-cudagraphs"  # the CUDA graph is this engine's own (static buffers, one per batch)


class TorchFloatEngine(Engine):
    backend = "cuda"

    def __init__(self, model: torch.nn.Module, input_shape, layers: dict, opt_batch: int, compile: bool = True):
        super().__init__(input_shape, layers, max_batch=None)
        self.device = torch.device("cuda", torch.cuda.current_device())
        module = copy.deepcopy(model).to(self.device).eval().half().to(memory_format=torch.channels_last)
        self.compile_seconds: float | None = None
        self.compile_error = ""
        self._fn = module
        if compile:
            try:
                compiled = torch.compile(module, mode=COMPILE_MODE)
                start = time.perf_counter()
                x = torch.randn(opt_batch, *self.input_shape[1:], device=self.device)
                with torch.no_grad():
                    for _ in range(2):
                        compiled(self._cast(x))
                torch.cuda.synchronize(self.device)
                self.compile_seconds = time.perf_counter() - start
                self._fn = compiled
            except Exception as e:  # no compiler toolchain, an op Inductor rejects: the eager fp16 graph stays
                self.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self._graphs: dict[int, tuple] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _cast(x: torch.Tensor) -> torch.Tensor:
        x = x.half()
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    @property
    def how(self) -> str:
        if self.compile_seconds is not None:
            return f"torch fp16 channels-last, torch.compile {COMPILE_MODE} ({self.compile_seconds:.0f} s), CUDA graph"
        return "torch fp16 channels-last, eager, CUDA graph" + (
            f" (torch.compile failed: {self.compile_error})" if self.compile_error else ""
        )

    def _graph(self, batch: int) -> tuple:
        if batch in self._graphs:
            return self._graphs[batch]
        x = torch.randn(batch, *self.input_shape[1:], device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                self._fn(self._cast(x))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            finite = torch.isfinite(x).all()
            out = self._fn(self._cast(x)).float()
        self._graphs[batch] = (graph, x, out, finite)
        return self._graphs[batch]

    def run_device(self, x, check_finite: bool = True) -> torch.Tensor:
        x = self.check_input(x, check_finite=False)
        with self._lock:
            graph, static, out, finite = self._graph(x.shape[0])
            static.copy_(x, non_blocking=True)
            graph.replay()
            result = out.clone()
            if check_finite and not bool(finite):
                raise EngineError("input contains NaN or infinite values")
        return result

    def run(self, x, check_finite: bool = True) -> torch.Tensor:
        out = self.run_device(x, check_finite)
        return out if isinstance(x, torch.Tensor) and x.device == self.device else out.cpu()

    def placement(self) -> list[LayerPlacement]:
        return [
            LayerPlacement(layer, info["op_type"], info["precision"], "fp16", (self.how,), 0, "float baseline")
            for layer, info in self.layers.items()
        ]

    def profile(self, x: torch.Tensor, runs: int = 20) -> list[LayerTime]:
        """The whole model as one row (Inductor fuses across layers): ``runs`` graph replays between CUDA
        events, the median of 5 such samples divided by ``runs``."""
        graph = self._graph(self.check_input(x).shape[0])[0]
        graph.replay()
        samples = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(max(1, runs)):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000 / max(1, runs))
        return [LayerTime("(whole model)", statistics.median(samples), (self.how,))]

    def members(self) -> dict[str, bytes]:
        raise EngineError("the torch fp16 float baseline is not saved as an engine file (save the model instead)")
