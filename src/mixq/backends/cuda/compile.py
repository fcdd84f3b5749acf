"""Parallel kernel compilation for the ``cuda`` backend.

Triton compiles one kernel per layer shape, epilogue and tile config, about a second each on one CPU core
and with the GIL held (threads do not help), so a ResNet-18 build that times seven tile configs per layer
would spend minutes compiling. Before tuning, a build therefore compiles every kernel it is about to use in
worker processes (``python -c``, so no user script is re-imported); Triton's on-disk cache then serves the
engine's own process. Anything a worker cannot compile is simply compiled (and its error raised) in the
engine's process later. ``MIXQ_CUDA_COMPILE_WORKERS`` sets the number of workers (0: compile in-process).

:func:`aot_compile` compiles one layer's kernel for a given GPU architecture on a machine without a GPU (no
launch: Triton's ahead-of-time path), to read what the compiler made of it (TTGIR, PTX, SASS, registers):
the notes in benchmarks/results/gpu-notes.md and the wgmma pipelining test use it.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["aot_compile", "precompile", "wgmma_waits", "worker_count"]


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
        code = "import sys; from mixq.backends.cuda.compile import _work; _work(*sys.argv[1:])"
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

    from .lower import Plan
    from .runners import ConvRunner

    data = pickle.loads(Path(path).read_bytes())
    plan = Plan([], data["tensors"], -1, ())
    device = torch.device("cuda")
    for op, config, strides in data["jobs"][int(index) :: int(count)]:
        try:
            ConvRunner(op, plan, device, config).warmup(data["batch"], strides)
        except Exception:
            continue


_TRITON_TYPES = {"int8": "i8", "float8_e4m3fn": "fp8e4nv", "float32": "fp32", "float16": "fp16", "int32": "i32"}
_RUNTIME_INTS = ("M", "a_zpi", "a2_zpi")  # not specialized (conv_kernel's do_not_specialize)


def aot_compile(runner, batch: int = 128, arch: int = 90, float_strides: dict | None = None):
    """The compiled ``conv_kernel`` of a ``ConvRunner`` (built on the CPU) for CUDA ``sm_<arch>``, without a GPU
    (Triton's ahead-of-time compile; run it in a process where ``TRITON_INTERPRET`` is not set). Returns
    Triton's compiled kernel: ``.asm["ttgir" | "ptx" | "cubin"]``, ``.metadata``."""
    import inspect
    import re

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import conv_kernel

    config = runner.config
    args, consts, _ = runner.kernel_arguments(batch, float_strides or {})
    consts = dict(consts, BM=config.bm, BN=config.bn, BK=config.bk, PERSIST=config.persist)
    params = list(inspect.signature(conv_kernel.fn).parameters)
    signature, attrs = {}, {}
    for i, p in enumerate(params):
        if p in consts:
            signature[p] = "constexpr"
        elif isinstance(args.get(p), torch.Tensor):
            signature[p] = "*" + _TRITON_TYPES[re.sub(r"^torch\.", "", str(args[p].dtype))]
            attrs[(i,)] = [["tt.divisibility", 16]]  # as Triton specializes 16-byte aligned pointers
        else:
            signature[p] = "i32" if p in _RUNTIME_INTS else "fp32"
    constexprs = {(params.index(p),): v for p, v in consts.items()}
    source = ASTSource(conv_kernel, signature, constexprs, attrs)
    options = {"num_warps": config.warps, "num_stages": config.stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def wgmma_waits(ttgir: str) -> list[int]:
    """The ``pendings`` count of every ``warp_group_dot_wait`` in a TTGIR listing: 0 after a wgmma means the
    loop waits for each one to finish (not pipelined); >= 1 lets the next one be issued first."""
    import re

    return [int(n) for n in re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", ttgir)]
