"""Parallel kernel compilation for the ``cuda`` backend.

Triton compiles one kernel per layer shape, epilogue and tile config, about a second each on one CPU core
and with the GIL held (threads do not help), so a ResNet-18 build that times seven tile configs per layer
would spend minutes compiling. Before tuning, a build therefore compiles every kernel it is about to use in
worker processes (``python -c``, so no user script is re-imported); Triton's on-disk cache then serves the
engine's own process. Anything a worker cannot compile is simply compiled (and its error raised) in the
engine's process later. ``MIXQ_CUDA_COMPILE_WORKERS`` sets the number of workers (0: compile in-process).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["precompile", "worker_count"]


def worker_count(jobs: int) -> int:
    env = os.environ.get("MIXQ_CUDA_COMPILE_WORKERS", "")
    wanted = int(env) if env.strip().isdigit() else max(1, (os.cpu_count() or 2) - 1)
    return max(0, min(wanted, jobs, 16))


def precompile(jobs: list, tensors: dict, batch: int) -> int:
    """Compile ``jobs`` (``(op, config, float_strides)`` of conv layers) in worker processes; returns the
    number of workers used (0: none, nothing done)."""
    workers = worker_count(len(jobs))
    if workers < 2:
        return 0
    with tempfile.TemporaryDirectory(prefix="mixq-compile-") as d:
        path = Path(d) / "jobs.pkl"
        path.write_bytes(pickle.dumps({"jobs": jobs, "tensors": tensors, "batch": batch}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.pop("TRITON_INTERPRET", None)
        code = "import sys; from mixq.backends.cuda_compile import _work; _work(*sys.argv[1:])"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(path), str(i), str(workers)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(workers)
        ]
        for p in procs:
            p.wait()
    return workers


def _work(path: str, index: str, count: str) -> None:
    """A worker: compile every ``count``-th job starting at ``index`` (errors are left to the engine's process)."""
    import torch

    from .cuda import ConvRunner
    from .cuda_lower import Plan

    data = pickle.loads(Path(path).read_bytes())
    plan = Plan([], data["tensors"], -1, ())
    device = torch.device("cuda")
    for op, config, strides in data["jobs"][int(index) :: int(count)]:
        try:
            ConvRunner(op, plan, device, config).warmup(data["batch"], strides)
        except Exception:
            continue
