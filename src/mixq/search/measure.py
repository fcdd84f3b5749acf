"""What the search measures, behind one small interface (:class:`Measurer`), and the real measurements
(:class:`EngineMeasurer`): PTQ fake-quant models for the metric, real engines from the backend registry
for latency and the verified metric.

An assignment is a sequence of choice names, one per unit in unit order. Every method is deterministic in
its arguments and returns plain JSON data, so :mod:`.cache` can keep it on disk. Tests drive the search
with fake measurers that implement the same interface.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import math
import os
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .._errors import MixqError
from .._timing import median_latency
from ..backends.profiling import LayerSamples
from .space import CHOICES, FLOAT, Unit, config_list_for, offered_on

__all__ = ["Measurer", "EngineMeasurer", "rounding_floor_db", "sqnr_db"]

ENGINE_CACHE_SIZE = 12  # built engines kept in memory (a ResNet-18 engine holds ~45 MB of weights)
PROFILE_ROUNDS = 3  # interleaved profiling rounds per backend
MEASUREMENT_VERSION = 2  # part of the cache fingerprint: bump when a measurement changes meaning


class Measurer(ABC):
    """The measurements a search makes. ``units`` is the unit list assignments refer to."""

    units: Sequence[Unit]

    @abstractmethod
    def fingerprint(self, depends: str) -> str:
        """A digest of everything the measurements of kind ``depends`` depend on: ``engine`` (model,
        calibration data, batch, machine, versions), ``eval`` and ``verify`` (that, plus the metric)."""

    @abstractmethod
    def backends(self) -> list[str]: ...

    @abstractmethod
    def reference(self) -> dict:
        """``{"eval": metric of the float model, "verify": verified metric of the float engine}``."""

    @abstractmethod
    def profile(self, backend: str, choice: str) -> dict:
        """The engine with every unit at ``choice`` on ``backend``, profiled per layer: ``{"times": {unit:
        us}, "total": us, "runs_as": {unit: precision}, "notes": {unit: placement note}}``."""

    @abstractmethod
    def latency(self, candidates: list, scale: int = 1) -> list:
        """Median ms of each ``[backend, assignment]`` engine, timed interleaved in one run (``scale`` times
        the usual number of runs)."""

    @abstractmethod
    def proxy(self, unit: str, choice: str) -> float:
        """Output SQNR (dB) of the model with only ``unit`` at ``choice`` against the float model."""

    @abstractmethod
    def metric(self, assignment) -> float:
        """The metric of the fake-quant model of ``assignment`` (PTQ)."""

    @abstractmethod
    def engine_metric(self, backend: str, assignment) -> float:
        """The verification metric of the engine of ``assignment`` on ``backend``."""


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (inf when identical)."""
    ref, out = ref.double(), out.double()
    noise = float((ref - out).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float(ref.pow(2).sum()), 1e-300) / noise)


def rounding_floor_db(fake_quant: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """SQNR of the fake-quant model in float32 against the same model in float64 on ``inputs``: how far float
    rounding alone moves it (each rounding difference that lands on a quantizer's bin edge flips the bin, and
    deep nets carry the flip on). An engine that sums in another order is not expected above this floor."""
    wide = copy.deepcopy(fake_quant).double()
    with torch.no_grad():
        ref = torch.cat([wide(x.double()).float() for x in inputs])
        out = torch.cat([fake_quant(x) for x in inputs])
    return sqnr_db(ref, out)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _machine() -> dict:
    cpu = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "onnxruntime", "openvino", "tensorrt", "mixq"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu, **versions}


class EngineMeasurer(Measurer):
    """Real measurements. ``batches``: calibration batches (CPU float tensors); ``eval_fn``/``verify_fn``
    take a ``predict(x) -> outputs`` callable and return a metric (higher is better). Latency is timed at
    ``batch`` on real calibration images."""

    def __init__(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        units: Sequence[Unit],
        backends: list[str],
        eval_fn: Callable,
        verify_fn: Callable,
        batch: int,
        runs: int = 20,
        profile_runs: int = 10,
        proxy_samples: int = 64,
        threads: int | None = None,
        choices: Sequence[str] = (FLOAT,),
    ):
        self.model = model
        self.batches = batches
        self.units = list(units)
        self._backends = list(backends)
        self.eval_fn, self.verify_fn = eval_fn, verify_fn
        self.batch, self.runs, self.profile_runs, self.threads = batch, runs, profile_runs, threads
        self.input_shape = (batch, *batches[0].shape[1:])
        images = torch.cat(batches)
        reps = -(-batch // len(images))
        self.x = images.repeat(reps, *([1] * (images.dim() - 1)))[:batch].contiguous()
        self.proxy_x = images[:proxy_samples]
        self.device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        self._calibrated: dict[str, dict] = {}
        self._speedups: dict = {}
        self._reference: dict | None = None
        self.choices = tuple(dict.fromkeys([FLOAT, *choices]))
        self._profiles: dict[tuple[str, str], dict] = {}
        self._proxy_ref: torch.Tensor | None = None
        self._base = _digest(
            type(model).__qualname__,
            str(model),
            *[v for _, v in sorted(model.state_dict().items())],
            *batches,
            [u.modules for u in self.units],
            {"batch": batch, "runs": runs, "profile_runs": profile_runs, "threads": threads},
            {"proxy_samples": proxy_samples, "version": MEASUREMENT_VERSION},
            _machine(),
        )

    # --- fingerprints and references ---------------------------------------------------------------------

    def fingerprint(self, depends: str) -> str:
        if depends == "engine":
            return self._base
        fn = self.eval_fn if depends == "eval" else self.verify_fn
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        return _digest(self._base, depends, name, self.reference()[depends])

    def backends(self) -> list[str]:
        return list(self._backends)

    def reference(self) -> dict:
        if self._reference is None:
            self._reference = {
                "eval": float(self._evaluate(self.eval_fn, self.model)),
                "verify": float(self.verify_fn(self.speedup(self._backends[0], self.float_assignment).engine.run)),
            }
        return self._reference

    # --- models and engines ------------------------------------------------------------------------------

    @property
    def float_assignment(self) -> tuple[str, ...]:
        return tuple(FLOAT for _ in self.units)

    def _calibrated_state(self, choice: str) -> dict:
        """State dict of the model with every unit at ``choice``, PTQ-calibrated on all batches. Calibration
        observes in float, so each layer's ranges are the same whatever the other layers' choices: one
        calibration per choice serves every assignment."""
        if choice not in self._calibrated:
            from ..quantization import PTQ, calibrate_, prepare_

            q = copy.deepcopy(self.model)
            prepare_(q, config_list_for(self.units, {u.name: choice for u in self.units}), PTQ(), self.example)
            calibrate_(q, lambda m: [m(b.to(self.device)) for b in self.batches])
            self._calibrated[choice] = q.state_dict()
        return self._calibrated[choice]

    @property
    def example(self) -> torch.Tensor:
        return self.batches[0][:1].to(self.device)

    def quantized_model(self, assignment) -> nn.Module:
        """The fake-quant model of ``assignment`` (the float model itself when all fp32)."""
        from ..quantization import PTQ, freeze_, prepare_

        picks = dict(zip((u.name for u in self.units), assignment, strict=True))
        config = config_list_for(self.units, picks)
        if not config:
            return self.model
        q = copy.deepcopy(self.model)
        prepare_(q, config, PTQ(), self.example)
        state = q.state_dict()
        for unit in self.units:
            choice = picks[unit.name]
            if choice == FLOAT:
                continue
            source = self._calibrated_state(choice)
            prefixes = tuple(f"{m}." for m in unit.modules)
            for key in [k for k in state if k.startswith(prefixes)]:
                if key not in source:
                    raise MixqError(f"search: calibrated state of {choice} has no {key!r} (layer {unit.name})")
                state[key] = source[key]
        q.load_state_dict(state)
        return freeze_(q).eval()

    def speedup(self, backend: str, assignment):
        """The ``ModelSpeedup`` (built engine) of ``assignment`` on ``backend``, kept for reuse."""
        from ..speedup import ModelSpeedup

        key = (backend, tuple(assignment))
        if key in self._speedups:
            self._speedups[key] = self._speedups.pop(key)  # most recently used last
            return self._speedups[key]
        shape, kw = self.input_shape, {"batchsize": self.batch, "backend": backend, "threads": self.threads}
        if all(c == FLOAT for c in assignment):
            s = ModelSpeedup(self.model, shape, config={}, **kw)
        elif all(CHOICES[c].act_bits == 16 for c in assignment):
            s = ModelSpeedup(self.model, shape, config={}, extra_layer_bits=16, **kw)  # NNI: every layer fp16
        else:
            s = ModelSpeedup(self.quantized_model(assignment), shape, calib_data_loader=self.batches, **kw)
        s.compress()
        if len(self._speedups) >= ENGINE_CACHE_SIZE:
            self._speedups.pop(next(iter(self._speedups)))
        self._speedups[key] = s
        return s

    def _evaluate(self, fn: Callable, model: nn.Module) -> float:
        model.eval()

        def predict(x):
            with torch.no_grad():
                return model(x.to(self.device)).float().cpu()

        return float(fn(predict))

    # --- measurements ------------------------------------------------------------------------------------

    def profile(self, backend: str, choice: str) -> dict:
        if (backend, choice) not in self._profiles:
            wanted = [c for c in (*self.choices, choice) if offered_on(c, backend)]
            self._profile_backend(backend, tuple(dict.fromkeys(wanted)))
        return self._profiles[backend, choice]

    def _profile_backend(self, backend: str, choices: Sequence[str]) -> None:
        """Profile the uniform engine of every choice on ``backend`` in interleaved rounds (so that drift in
        the machine's load hits all alike) and keep each layer's median over the rounds. A choice that no
        unit runs as asked is not timed."""
        from ..report import fusion_groups, group_times

        names = [u.name for u in self.units]
        engines, groups = {}, {}
        for c in choices:
            engine = self.speedup(backend, tuple(c for _ in self.units)).engine
            rows = {r.layer: r for r in engine.placement()}
            runs_as = {n: rows[n].runs_as if n in rows else "missing" for n in names}
            notes = {n: rows[n].note if n in rows else "" for n in names}
            self._profiles[backend, c] = {
                "times": dict.fromkeys(names, 0.0),
                "total": 0.0,
                "runs_as": runs_as,
                "notes": notes,
            }
            if c == FLOAT or CHOICES[c].precision in runs_as.values():
                engines[c] = engine
                groups[c] = fusion_groups(self.model, engine.layers, self.x[:1].to(self.device))
        rounds = min(PROFILE_ROUNDS, self.profile_runs)
        samples = {c: LayerSamples(rounds) for c in engines}
        for r in range(rounds):
            for c, engine in engines.items():
                for key, us in group_times(engine.profile(self.x, -(-self.profile_runs // rounds)), groups[c]).items():
                    samples[c].add(key, r, us)
        for c, per_key in samples.items():
            median = per_key.medians()
            self._profiles[backend, c]["times"] = {n: float(median.get(n, 0.0)) for n in names}
            self._profiles[backend, c]["total"] = float(sum(median.values()))

    def time_engines(self, engines: list, scale: int = 1) -> list[float]:
        """Median ms per engine at the search batch, interleaved in rounds (noise hits all alike)."""
        runners = {str(i): e.run for i, e in enumerate(engines)}
        runs = self.runs * scale
        seconds = median_latency(runners, self.x, warmup=3, runs=runs, rounds=min(5, runs))
        return [seconds[str(i)] * 1e3 for i in range(len(engines))]

    def latency(self, candidates: list, scale: int = 1) -> list:
        return self.time_engines([self.speedup(b, tuple(a)).engine for b, a in candidates], scale)

    def proxy(self, unit: str, choice: str) -> float:
        assignment = [choice if u.name == unit else FLOAT for u in self.units]
        with torch.no_grad():
            if self._proxy_ref is None:
                self._proxy_ref = self.model.eval()(self.proxy_x.to(self.device)).float().cpu()
            out = self.quantized_model(assignment)(self.proxy_x.to(self.device)).float().cpu()
        return sqnr_db(self._proxy_ref, out)

    def metric(self, assignment) -> float:
        return self._evaluate(self.eval_fn, self.quantized_model(assignment))

    def engine_metric(self, backend: str, assignment) -> float:
        return float(self.verify_fn(self.speedup(backend, tuple(assignment)).engine.run))
