"""The hardware-aware search (issue 14) against hand-written configurations, on this machine's CPU engines.

    MIXQ_DATA=../shared/data python benchmarks/search.py lenet --out benchmarks/results/search-lenet
    MIXQ_DATA=../shared/data python benchmarks/search.py resnet18_cifar --batch 64 \
        --out benchmarks/results/search-resnet18

Per model: ``mixq.search`` with a budget of 0.5 points of top-1 (choices fp32, fp16, int8, int8 with 7-bit
weights, fp8; every CPU backend), then a comparison: all-fp32, all-int8, the seed's hand-written mixed
config, other hand-written configs, and the search's config, each PTQ-calibrated on the same images and
built on every CPU backend. All comparison engines are timed interleaved in one run (median of one call at
``--batch`` after warm-up) and scored on test images the search never saw.

Data: calibration = the first 512 training images; the search's metric = test images [0, E); its
verification = [E, E + V); the comparison table = [E + V, E + V + T). LeNet is trained here (one epoch, SGD
lr 0.01 momentum 0.5, as benchmarks/engines.py); ResNet-18 is the trained CIFAR-10 model of
``mixq.zoo.pretrained`` (94.62% fp32, benchmarks/results/train-cifar).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import mixq
from mixq.speedup import ModelSpeedup
from mixq.zoo.data import load_cifar10
from mixq.zoo.metrics import accuracy, median_latency
from mixq.zoo.models import create_model
from mixq.zoo.tutorial import (
    ALL_8BIT_CONFIG_LIST,
    FAST_MIXED_CONFIG_LIST,
    TUTORIAL_CONFIG_LIST,
    MnistTask,
    trainer,
)

sys.path.insert(0, str(Path(__file__).parent))
from engines import cpu_info, openvino_version
from seed_tables import cifar_configs

BACKENDS = ("onnxruntime", "openvino")
CHOICES = ("fp32", "fp16", "int8", "int8w7", "fp8")
W7 = {"input": 8, "weight": 7}


def lenet_configs() -> dict:
    return {
        "all int8 (tutorial style: conv/fc in+w, ReLU out)": ALL_8BIT_CONFIG_LIST,
        "seed mixed: NNI tutorial config (convs, fc1, fc2 int8)": TUTORIAL_CONFIG_LIST,
        "hand: fc layers int8, 7-bit weights (fast_mixed.yaml)": FAST_MIXED_CONFIG_LIST,
        "hand: fc1 + fc2 int8, 7-bit weights": [
            {"quant_types": ["input", "weight"], "quant_bits": W7, "op_names": ["fc1", "fc2"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu3", "relu4"]},
        ],
        "hand: fc1 int8, 7-bit weights": [
            {"quant_types": ["input", "weight"], "quant_bits": W7, "op_names": ["fc1"]},
        ],
        "hand: convs int8 only": [
            {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2"]},
        ],
    }


def resnet_configs() -> dict:
    seed = cifar_configs()
    return {
        "all int8 (tutorial style: conv/fc in+w, ReLU out)": ALL_8BIT_CONFIG_LIST,
        "seed mixed: stem conv + fc float, rest int8 (7-bit weights)": seed[
            "mixed: stem conv + fc float, rest int8 (7-bit weights)"
        ],
        "seed: all int8, 7-bit weights (conv outputs quantized)": seed["all in 8bit, 7-bit weights"],
        "hand: all int8, conv outputs quantized too": [
            {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
            {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
        ],
        "hand: stem conv + fc float, rest int8 (tutorial style)": [
            {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
            {"exclude": True, "op_names": ["conv1", "relu"]},
        ],
    }


def load_model(name: str, data_dir, log):
    """(float model in eval mode, training images, test set, where the weights come from)."""
    if name == "lenet":
        task = MnistTask(data_dir, seed=0)
        torch.manual_seed(0)
        model = create_model("lenet")
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
        log("training LeNet for one epoch (fp32)")
        trainer(model, opt, F.nll_loss, task.train_loader(0))
        return model.eval(), task.train_set.tensors[0], task.test_set, "trained here: 1 epoch fp32, SGD lr 0.01"
    from mixq.zoo.pretrained import load_pretrained

    model = load_pretrained(name)
    train = load_cifar10(True, data_dir, limit=2048).tensors[0]
    return model, train, load_cifar10(False, data_dir), f"mixq.zoo.pretrained.load_pretrained({name!r})"


def ptq(model, config, calib_batches):
    q = copy.deepcopy(model)
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib_batches[0][:1])
    mixq.calibrate_(q, lambda m: [m(b) for b in calib_batches])
    return q.eval()


def placement_note(engine) -> str:
    rows = [r for r in engine.placement() if r.op_type in ("Conv1d", "Conv2d", "Linear")]
    return f"{sum(r.runs_as == 'int8' for r in rows)}/{len(rows)} conv/linear int8"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["lenet", "resnet18_cifar"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--eval-images", type=int, default=None, help="default: 2000 (LeNet), 1000 (ResNet-18)")
    p.add_argument("--verify-images", type=int, default=None, help="default: 4000 (LeNet), 2000 (ResNet-18)")
    p.add_argument("--table-images", type=int, default=None, help="default: 4000 (LeNet), 3000 (ResNet-18)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per comparison engine (default 200 / 20)")
    p.add_argument("--search-runs", type=int, default=None, help="the search's runs per engine (default 50 / 10)")
    p.add_argument("--max-measured", type=int, default=None, help="the search's max_measured (default all / 24)")
    p.add_argument(
        "--cache", default=None, help="the search's cache folder (default: none, measurements kept in memory)"
    )
    p.add_argument("--out", required=True, help="writes OUT.md, OUT.png (comparison), OUT-pareto.png (search)")
    args = p.parse_args(argv)
    lenet = args.model == "lenet"
    e = args.eval_images or (2000 if lenet else 1000)
    v = args.verify_images or (4000 if lenet else 2000)
    t = args.table_images or (4000 if lenet else 3000)
    runs = args.runs or (200 if lenet else 20)
    warmup = 20 if lenet else 3
    search_runs = args.search_runs or (50 if lenet else 10)
    started = time.time()

    def log(text):
        print(f"[{time.time() - started:7.1f}s] {text}", file=sys.stderr, flush=True)

    lines = [
        f"machine: {cpu_info()}; {platform.platform()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, openvino {openvino_version()}, mixq {mixq.__version__}",
        f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}",
        f"load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    torch.manual_seed(0)
    model, train_x, test, weights = load_model(args.model, args.data_dir, log)
    calib = train_x[:512]
    calib_batches = [calib[i : i + 64] for i in range(0, len(calib), 64)]
    x, y = test.tensors
    sets = {
        "eval": TensorDataset(x[:e], y[:e]),
        "verify": TensorDataset(x[e : e + v], y[e : e + v]),
        "table": TensorDataset(x[e + v : e + v + t], y[e + v : e + v + t]),
    }

    # --- the search ------------------------------------------------------------------------------------
    def eval_fn(predict):
        return accuracy(predict, sets["eval"], 500)

    def verify_fn(predict):
        return accuracy(predict, sets["verify"], 500)

    log(f"search: budget {args.max_drop} points, batch {args.batch}")
    t0 = time.time()
    result = mixq.search(
        model,
        calib_batches,
        eval_fn,
        verify_fn=verify_fn,
        budget=args.max_drop,
        backends=BACKENDS,
        choices=CHOICES,
        batch=args.batch,
        runs=search_runs,
        profile_runs=10 if lenet else 5,
        max_measured=args.max_measured if args.max_measured is not None else (None if lenet else 24),
        cache_dir=args.cache,
        progress=lambda text: log(f"search: {text}"),
    )
    search_seconds = time.time() - t0
    out = Path(args.out)
    result.plot(out.with_name(out.name + "-pareto.png"), title=f"mixq search: {args.model}, batch {args.batch}")

    # --- the comparison --------------------------------------------------------------------------------
    configs = {"all fp32": []} | (lenet_configs() if lenet else resnet_configs())
    configs["search's config"] = result.config_list
    shape = (args.batch, *calib.shape[1:])
    engines, notes = {}, {}
    for name, config in configs.items():
        q = ptq(model, config, calib_batches) if config else model
        for backend in BACKENDS:
            log(f"building {name} on {backend}")
            kw = {"config": {}} if not config else {"calib_data_loader": calib_batches}
            s = ModelSpeedup(q, shape, batchsize=args.batch, backend=backend, **kw).compress()
            engines[name, backend] = s.engine
            notes[name, backend] = placement_note(s.engine) if config else "float engine"
    log("scoring every engine on the table images")
    top1 = {k: accuracy(eng.run, sets["table"], 500) for k, eng in engines.items()}
    load_before = os.getloadavg()
    log(f"timing {len(engines)} engines interleaved ({runs} runs each, warm-up {warmup})")
    xb = x[e + v : e + v + args.batch].contiguous()
    times = median_latency({k: eng.run for k, eng in engines.items()}, xb, warmup, runs, rounds=5)
    load_after = os.getloadavg()
    fastest_float = min(times[("all fp32", b)] for b in BACKENDS)
    ref = max(top1[("all fp32", b)] for b in BACKENDS)

    # --- the table -------------------------------------------------------------------------------------
    within = {k: ref - top1[k] <= args.max_drop for k in engines}
    hand = [k for k in engines if k[0] not in ("all fp32", "search's config") and within[k]]
    best_hand = min(hand, key=lambda k: times[k], default=None)
    floats = [k for k in engines if k[0] == "all fp32"]
    best_float = min(floats, key=lambda k: times[k])
    chosen = ("search's config", result.backend) if result.config_list else best_float
    lines += [
        f"weights: {weights}; calibration: 512 training images (PTQ, min/max); batch {args.batch}",
        f"search: {search_seconds:.0f} s wall (measurements cached under --cache when given); its metric: top-1 on "
        f"test images [0, {e}); its verification: [{e}, {e + v}); this table: [{e + v}, {e + v + t})",
        f"timing: every engine below interleaved in one run, 5 rounds, {runs} timed calls each after {warmup} "
        f"warm-up, median; load average during timing: {load_before[0]:.2f} before, {load_after[0]:.2f} after",
        "",
        "## the search's answer",
        "",
        "```",
        result.summary(),
        f"config_list: {result.config_list}",
        "```",
        "",
        f"## comparison on every CPU backend (budget: at most {args.max_drop} points below the best fp32 engine, "
        f"{ref:.2f}%)",
        "",
        "| configuration | backend | median ms | vs fastest fp32 | top-1 % | drop | within budget | placement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in engines:
        mark = " **(search's choice)**" if k == chosen else ""
        lines.append(
            f"| {k[0]}{mark} | {k[1]} | {times[k] * 1e3:.3f} | {times[k] / fastest_float:.2f} | {top1[k]:.2f} | "
            f"{ref - top1[k]:.2f} | {'yes' if within[k] else 'no'} | {notes[k]} |"
        )
    lines.append("")
    if best_hand is not None:
        lines.append(
            f"fastest hand-written configuration within budget: {best_hand[0]} on {best_hand[1]}, "
            f"{times[best_hand] * 1e3:.3f} ms; the search's choice ({chosen[0]} on {chosen[1]}): "
            f"{times[chosen] * 1e3:.3f} ms ({times[chosen] / times[best_hand]:.2f}x)"
        )
    else:
        lines.append("no hand-written quantized configuration was within budget")
    lines.append(
        f"fastest float engine: {best_float[1]} {times[best_float] * 1e3:.3f} ms; the search's choice: "
        f"{times[chosen] / times[best_float]:.2f}x of it"
    )
    lines += [
        "",
        "## every configuration the search evaluated (its own runs; latency relative to the fastest float engine "
        "of the same interleaved run)",
        "",
        result.pareto_table(),
        "",
        "## layer options the search considered (predicted per-layer gain from the profiles; drop on its metric)",
        "",
        result.sensitivity_table(),
        "",
        "## placement report of the search's winner",
        "",
        "```",
        str(result.report),
        "```",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    plot(engines, times, top1, fastest_float, chosen, ref - args.max_drop, out.with_suffix(".png"), args)
    return 0


def plot(engines, times, top1, fastest_float, chosen, floor, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(k[0] for k in engines))
    for backend, marker in zip(BACKENDS, "os", strict=True):
        for i, name in enumerate(names):
            k = (name, backend)
            ax.scatter(
                times[k] / fastest_float,
                top1[k],
                marker=marker,
                color=f"C{i}",
                s=60,
                label=name if backend == BACKENDS[0] else None,
            )
    ax.scatter(
        times[chosen] / fastest_float,
        top1[chosen],
        marker="*",
        s=300,
        c="red",
        zorder=5,
        label=f"search's choice ({chosen[1]})",
    )
    ax.axhline(floor, color="grey", ls=":", lw=1)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("latency / fastest fp32 engine (one interleaved run)  [o onnxruntime, s openvino]")
    ax.set_ylabel("top-1 % on held-out test images")
    ax.set_title(f"{args.model}, batch {args.batch}: search vs hand-written configs (dotted: budget)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
