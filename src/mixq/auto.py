"""``backend="auto"``: build the engines this machine can run, time them on the user's input shape, keep the
fastest, and never keep a quantized engine that is slower than the fastest float one.

The measurement is what decides: which engine wins depends on the model and the CPU (measured: on one
machine OpenVINO runs ResNet-18's int8 graph at a quarter of ONNX Runtime's float latency, while a small
LeNet is fastest as ONNX Runtime float because OpenVINO has a fixed cost per call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._timing import median_latency
from .backends import Engine, EngineError, backends_on, get_backend, list_backends

__all__ = ["Candidate", "Selection", "candidate_backends", "select_engine"]


@dataclass(frozen=True)
class Candidate:
    """One engine that was built and timed: ``name`` like ``openvino int8``."""

    name: str
    backend: str
    quantized: bool
    milliseconds: float


@dataclass(frozen=True)
class Selection:
    """What ``auto`` tried and what it kept (``chosen``), with the reason in one line."""

    candidates: tuple[Candidate, ...]
    chosen: str
    reason: str
    batch: int
    runs: int

    def __str__(self) -> str:
        lines = [f"backend auto: timed at batch {self.batch}, median of {self.runs} runs each"]
        for c in sorted(self.candidates, key=lambda c: c.milliseconds):
            mark = "  <- chosen" if c.name == self.chosen else ""
            lines.append(f"  {c.name}: {c.milliseconds:.3f} ms{mark}")
        lines.append(f"  {self.reason}")
        return "\n".join(lines)


def candidate_backends(on_cuda: bool = False) -> list[str]:
    """Registered backends usable here, in a stable order: those whose engines run on the CPU (each backend's
    ``device``), then, when ``on_cuda`` (the model or input lives on CUDA), those that run on CUDA."""
    wanted = backends_on("cpu") + (backends_on("cuda") if on_cuda else [])
    out = []
    for name in wanted:
        try:
            get_backend(name)
        except EngineError:
            continue
        out.append(name)
    if not out:
        raise EngineError(f"backend 'auto': no usable backend on this machine (registered: {list_backends()})")
    return out


def select_engine(
    quantized: dict[str, Callable[[], Engine]],
    floats: dict[str, Callable[[], Engine]],
    x: torch.Tensor,
    warmup: int = 3,
    runs: int = 10,
) -> tuple[Engine, Selection]:
    """Build every candidate (``{backend: build}``), time them on ``x``, return the fastest quantized engine
    unless the fastest float engine beats it, in which case the float engine is returned and the reason
    says so. A backend that fails to build, and a quantized engine that knows it is not exact here
    (:attr:`Engine.inexact`), are skipped and named in the reason; if none is left, that is an error."""
    built: dict[str, Engine] = {}
    kinds: dict[str, tuple[str, bool]] = {}
    failures: list[str] = []
    for is_quantized, group in ((True, quantized), (False, floats)):
        for backend, build in group.items():
            name = f"{backend} {'quantized' if is_quantized else 'float'}"
            try:
                built[name] = build()
            except EngineError as e:
                failures.append(f"{name}: {e}")
                continue
            if is_quantized and built[name].inexact:
                # Fast but wrong is no candidate: say why it was left out.
                failures.append(f"{name}: skipped, not exact: {built.pop(name).inexact}")
                continue
            kinds[name] = (backend, is_quantized)
    if not built:
        raise EngineError("backend 'auto': no candidate engine could be built: " + "; ".join(failures))
    # One call per round, interleaved, so that drift in machine load hits all engines alike.
    seconds = median_latency({k: _timed_run(e, x) for k, e in built.items()}, x, warmup, runs, rounds=runs)
    times = {k: 1e3 * v for k, v in seconds.items()}
    candidates = tuple(Candidate(n, kinds[n][0], kinds[n][1], times[n]) for n in built)
    best_q = min((c for c in candidates if c.quantized), key=lambda c: c.milliseconds, default=None)
    best_f = min((c for c in candidates if not c.quantized), key=lambda c: c.milliseconds, default=None)
    if best_q is not None and (best_f is None or best_q.milliseconds <= best_f.milliseconds):
        chosen = best_q
        reason = "kept the fastest quantized engine" + (
            f" ({best_f.milliseconds / best_q.milliseconds:.2f}x faster than the fastest float engine)"
            if best_f
            else ""
        )
    elif best_q is not None:
        chosen = best_f
        reason = (
            f"every quantized engine was slower than {best_f.name} ({best_q.name}: {best_q.milliseconds:.3f} ms vs "
            f"{best_f.milliseconds:.3f} ms), so auto returns the float engine; see the placement report for why"
        )
    else:
        chosen = best_f
        reason = (
            "no quantized engine was left to time: kept the fastest float engine"
            if quantized
            else "no quantized layers requested: kept the fastest float engine"
        )
    if failures:
        reason += "; not built or skipped: " + "; ".join(failures)
    selection = Selection(candidates, chosen.name, reason, int(x.shape[0]), runs)
    return built[chosen.name], selection


def _timed_run(engine: Engine, x: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """What is timed for one engine: its ``run`` on ``x``, or for an engine on a GPU on ``x`` already copied
    there (a CUDA model's user passes CUDA batches; the copy would otherwise be timed with the engine)."""
    device = getattr(engine, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        on_device = x.to(device)
        return lambda _x: engine.run(on_device)
    return engine.run
