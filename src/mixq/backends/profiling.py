"""Per-layer profiling shared by the backends: time samples per layer and run, kept as the median per layer
(one formula for every backend's ``Engine.profile`` and for the search's interleaved rounds)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from .base import LayerTime

__all__ = ["LayerSamples"]


class LayerSamples:
    """Microseconds per layer and run, summed within a run; a layer without time in some run counts 0 there.
    ``runs``: how many runs; :meth:`medians` and :meth:`layer_times` read the last ``keep`` of them (all when
    None; e.g. leave out warm-up runs a trace recorded too)."""

    def __init__(self, runs: int, keep: int | None = None):
        self.runs = max(1, int(runs))
        self.keep = self.runs if keep is None else max(1, min(int(keep), self.runs))
        self._us: dict[str, list[float]] = defaultdict(lambda: [0.0] * self.runs)
        self._kernels: dict[str, set[str]] = defaultdict(set)

    def add(self, layer: str, run: int, microseconds: float, kernel: str | None = None) -> None:
        self._us[layer][min(max(0, run), self.runs - 1)] += float(microseconds)
        if kernel is not None:
            self._kernels[layer].add(kernel)

    def medians(self, scale: float = 1.0) -> dict[str, float]:
        """``{layer: scale * median microseconds}``."""
        return {layer: scale * statistics.median(us[-self.keep :]) for layer, us in self._us.items()}

    def layer_times(self, scale: float = 1.0) -> list[LayerTime]:
        """:meth:`medians` as :class:`LayerTime` rows with the kernels seen, slowest first."""
        times = self.medians(scale)
        return [
            LayerTime(k, v, tuple(sorted(self._kernels[k]))) for k, v in sorted(times.items(), key=lambda kv: -kv[1])
        ]
