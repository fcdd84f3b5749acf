"""``mixq demo``: the NNI tutorial end to end on MNIST — train fp32 and QAT variants, export, build engines,
measure accuracy on the full test set and latency at batch 128, and write the table, a JSON copy, the
placement report of the all-8-bit engine and a latency/accuracy plot."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_write
from ..speedup import ModelSpeedup
from .metrics import accuracy, average_bits, layer_costs, median_latency
from .tutorial import (
    ALL_8BIT_CONFIG_LIST,
    FAST_MIXED_CONFIG_LIST,
    TUTORIAL_CONFIG_LIST,
    MnistTask,
    train_variants,
)

__all__ = ["DemoOptions", "run_demo"]

STRATEGIES = {
    "all in 32bit": None,
    "tutorial mixed config (QAT)": TUTORIAL_CONFIG_LIST,
    "all in 8bit (QAT)": ALL_8BIT_CONFIG_LIST,
    "mixq fast mixed: fc int8, 7-bit weights (QAT)": FAST_MIXED_CONFIG_LIST,
}


@dataclass(frozen=True)
class DemoOptions:
    data_dir: str | None = None
    out: str = "runs/demo"
    epochs: int = 3
    quick: bool = False
    seed: int = 0
    backend: str = "onnxruntime"
    batch: int = 128
    warmup: int = 10
    runs: int = 100


def _machine(backend: str) -> str:
    import onnxruntime

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"mixq {__version__}; backend {backend}"
    )


def run_demo(opts: DemoOptions, progress_factory=None, log=print) -> dict:
    out = Path(opts.out)
    # --quick (CI): 12k training images for 2 epochs (188 SGD steps) reach roughly 80-90%; 2k test images.
    train_limit, test_limit = (12_000, 2000) if opts.quick else (None, None)
    epochs = 2 if opts.quick else opts.epochs
    runs, warmup = (20, 3) if opts.quick else (opts.runs, opts.warmup)
    task = MnistTask(opts.data_dir, train_limit=train_limit, test_limit=test_limit, seed=opts.seed)
    print(
        f"mixq demo: training {len(STRATEGIES)} strategies x {epochs} epoch(s) on {len(task.train_set)} images, "
        "then building engines (Ctrl-C stops cleanly)",
        file=sys.stderr,
        flush=True,
    )
    variants = train_variants(task, STRATEGIES, epochs, opts.seed, progress_factory)
    example = task.test_set.tensors[0][:1]
    costs = layer_costs(variants["all in 32bit"].model, example)
    shape = (opts.batch, 1, 28, 28)

    engines, rows = {}, []
    for name, v in variants.items():
        if v.quantizer is None:
            calibration = {}
            speedup = ModelSpeedup(v.model, shape, config={}, batchsize=opts.batch, backend=opts.backend)
        else:
            slug = name.split(" (")[0].replace(" ", "_").replace(":", "").replace(",", "")
            calibration = v.quantizer.export_model(out / f"{slug}_model.pth", out / f"{slug}_calibration.json")
            speedup = ModelSpeedup(v.model, shape, batchsize=opts.batch, backend=opts.backend)
        speedup.compress()
        engines[name] = speedup
        by_mac, by_param = average_bits(costs, calibration)
        rows.append(
            {
                "strategy": name,
                "avg_bits_mac": round(by_mac, 2),
                "avg_bits_params": round(by_param, 2),
                "accuracy_engine": accuracy(lambda x, s=speedup: s.inference(x)[0], task.test_set),
                "accuracy_pytorch": v.accuracy,
                "train_seconds_per_epoch": sum(v.epoch_seconds) / len(v.epoch_seconds),
            }
        )
    x = task.test_set.tensors[0][: opts.batch].contiguous()
    if len(x) < opts.batch:
        x = x.repeat((opts.batch + len(x) - 1) // len(x), 1, 1, 1)[: opts.batch]
    latency = median_latency({k: (lambda t, s=s: s.engine.run(t)) for k, s in engines.items()}, x, warmup, runs)
    base = latency["all in 32bit"]
    for row in rows:
        row["latency_ms"] = latency[row["strategy"]] * 1e3
        row["latency_vs_fp32"] = latency[row["strategy"]] / base

    report = engines["all in 8bit (QAT)"].report(compare_float=True, batch=opts.batch, runs=5 if opts.quick else 20)
    machine = _machine(opts.backend)
    header = (
        f"MNIST LeNet (NNI tutorial), {epochs} epoch(s) per strategy, {len(task.train_set)} train / "
        f"{len(task.test_set)} test images, seed {opts.seed}\nmachine: {machine}\nlatency: batch {opts.batch}, "
        f"median of {runs} runs after {warmup} warm-up, interleaved in 5 rounds; accuracy: the engine on the "
        f"whole test set (PyTorch fake-quant model beside it)\naverage bits: weight bits averaged over conv/linear "
        f"layers weighted by MACs (by parameters in brackets); float layers count 32"
    )
    lines = [
        header,
        "",
        "| strategy | average bits | latency ms | vs 32bit | accuracy (engine) | accuracy (PyTorch) | QAT s/epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['avg_bits_mac']:.2f} ({r['avg_bits_params']:.2f}) | {r['latency_ms']:.3f} | "
            f"{r['latency_vs_fp32']:.2f} | {r['accuracy_engine']:.2f}% | {r['accuracy_pytorch']:.2f}% | "
            f"{r['train_seconds_per_epoch']:.1f} |"
        )
    table = "\n".join(lines)
    placement = "Why all-8-bit runs as it does (per-layer placement and time on this backend):\n" + str(report)
    log(table)
    log("")
    log(placement)
    with atomic_write(out / "results.md", "w") as f:
        f.write(table + "\n\n```\n" + placement + "\n```\n")
    with atomic_write(out / "results.json", "w") as f:
        json.dump(
            {"machine": machine, "epochs": epochs, "batch": opts.batch, "runs": runs, "warmup": warmup, "rows": rows},
            f,
            indent=1,
        )
    plot = _plot(rows, out / "latency_accuracy.png")
    log(f"\nwrote {out}/results.md, results.json" + (f", {plot.name}" if plot else " (matplotlib missing: no plot)"))
    return {"rows": rows, "report": report}


def _plot(rows, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["latency_ms"], r["accuracy_engine"])
        ax.annotate(r["strategy"], (r["latency_ms"], r["accuracy_engine"]), fontsize=7)
    ax.margins(x=0.35, y=0.15)
    ax.set_xlabel("latency at batch 128 (ms)")
    ax.set_ylabel("top-1 accuracy, engine (%)")
    ax.set_title("MNIST LeNet: latency vs accuracy")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
