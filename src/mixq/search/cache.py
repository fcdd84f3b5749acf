"""Every measurement of a search on disk, so that a rerun or an interrupted run resumes where it stopped.

One JSON file per context (model weights and architecture, calibration data, batch, machine, versions:
:meth:`Measurer.fingerprint`), mapping a measurement's key (the method and its arguments, plus the
fingerprint of what it depends on) to its result. The file is rewritten atomically after each new
measurement, so a kill at any moment leaves the previous complete file. Results are plain JSON data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .._errors import ConfigError
from .._io import atomic_write
from .measure import Measurer

__all__ = ["DiskCache", "CachedMeasurer", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mixq/search`` (``~/.cache/mixq/search``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixq" / "search"


class DiskCache:
    """A JSON dict on disk; ``None`` as the path keeps it in memory only."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.data: dict = {}
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                raise ConfigError(f"search cache {self.path} cannot be read ({e}); delete it to start afresh") from e
            if not isinstance(self.data, dict):
                raise ConfigError(f"search cache {self.path} is not a mixq search cache; delete it to start afresh")

    def get_or(self, key: str, compute: Callable[[], object]) -> tuple[object, bool]:
        """(value, whether it came from the cache); a new value is written to disk at once."""
        if key in self.data:
            return self.data[key], True
        value = compute()
        self.data[key] = value
        if self.path is not None:
            with atomic_write(self.path, "w") as f:
                json.dump(self.data, f)
        return value, False


class CachedMeasurer(Measurer):
    """``inner`` with every measurement looked up in ``cache`` first. ``hits``/``misses`` count lookups."""

    def __init__(self, inner: Measurer, cache: DiskCache):
        self.inner, self.cache = inner, cache
        self.units = inner.units
        self.hits = self.misses = 0

    def _get(self, depends: str, method: str, *args):
        key = json.dumps([self.inner.fingerprint(depends), method, *args])
        value, cached = self.cache.get_or(key, lambda: getattr(self.inner, method)(*args))
        if cached:
            self.hits += 1
        else:
            self.misses += 1
        return value

    def fingerprint(self, depends: str) -> str:
        return self.inner.fingerprint(depends)

    def backends(self) -> list[str]:
        return self.inner.backends()

    def reference(self) -> dict:
        return self.inner.reference()  # not cached: it is part of the metric fingerprints

    def profile(self, backend: str, choice: str) -> dict:
        return self._get("engine", "profile", backend, choice)

    def latency(self, candidates: list, scale: int = 1) -> list:
        return self._get("engine", "latency", [[b, list(a)] for b, a in candidates], scale)

    def proxy(self, unit: str, choice: str) -> float:
        return self._get("engine", "proxy", unit, choice)

    def metric(self, assignment) -> float:
        return self._get("eval", "metric", list(assignment))

    def engine_metric(self, backend: str, assignment) -> float:
        return self._get("verify", "engine_metric", backend, list(assignment))
