"""Interleaved median latency: one timing loop for ``backend="auto"``, the CLI and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_latency"]


def median_latency(
    runners: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, warmup: int, runs: int, rounds: int = 5
) -> dict[str, float]:
    """Median seconds per call for each runner: warm-up, then ``runs`` calls split into ``rounds`` rounds
    interleaved across runners, so that drift of a noisy machine hits all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run(x)
                samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}
