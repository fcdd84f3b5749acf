"""Soak test: build, save, load and run engines in a loop; print resident memory so growth shows.

    python benchmarks/soak.py --minutes 2 --out benchmarks/results/soak-cpu.md

Each iteration: export the Q/DQ model of a QAT-prepared LeNet, build an ONNX Runtime engine, save it, load it
back, run 20 batches of 128, drop everything. RSS is read from /proc/self/statm after gc.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import mixq
from mixq.backends import load_engine
from mixq.nni import QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.zoo.models import TorchModel
from mixq.zoo.tutorial import ALL_8BIT_CONFIG_LIST


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = TorchModel()
    QAT_Quantizer(model, ALL_8BIT_CONFIG_LIST)
    model.train()
    model(torch.randn(64, 1, 28, 28))
    model.eval()
    x = torch.randn(128, 1, 28, 28)
    samples, start, i = [], time.time(), 0
    with tempfile.TemporaryDirectory() as d:
        while time.time() - start < args.minutes * 60:
            s = ModelSpeedup(model, (128, 1, 28, 28)).compress()
            path = s.export_quantized_model(Path(d) / "e.mixq")
            engine = load_engine(path)
            for _ in range(20):
                engine.run(x)
            del s, engine
            gc.collect()
            i += 1
            samples.append((i, time.time() - start, rss_mb()))
    warm = samples[min(4, len(samples) - 1)]
    last = samples[-1]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; mixq {mixq.__version__}",
        f"command: python benchmarks/soak.py {' '.join(sys.argv[1:])}",
        f"{len(samples)} iterations in {last[1]:.0f} s (build + save + load + 20 runs at batch 128 each)",
        "",
        "| iteration | seconds | RSS MB |",
        "|---|---|---|",
        *[f"| {n} | {t:.0f} | {m:.1f} |" for n, t, m in samples[:: max(1, len(samples) // 12)]],
        f"| {last[0]} | {last[1]:.0f} | {last[2]:.1f} |",
        "",
        f"RSS after warm-up (iteration {warm[0]}): {warm[2]:.1f} MB; at the end: {last[2]:.1f} MB; "
        f"growth {last[2] - warm[2]:+.1f} MB over {last[0] - warm[0]} iterations",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
