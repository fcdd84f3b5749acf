"""Engine latency on this machine: PyTorch fp32, ORT fp32, mixq int8 / mixed, and ORT's own quantize_static.

    MIXQ_DATA=../shared/data python benchmarks/engines.py --out benchmarks/results/engines-cpu.md

Every variant runs in one process, interleaved in rounds so that drift of the machine hits all alike; the
table gives the median wall time of ``engine.run`` / ``session.run`` (input checks included for mixq) after
warm-up. Quality: top-1 agreement with the PyTorch fp32 model on real test images (LeNet trained one epoch
in fp32 here; ResNet-18 has random weights, so only agreement and speed mean something for it). Every int8
variant is calibrated on the same 512 real training images (min/max).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F

import mixq
from mixq.export import export_float_onnx as export_onnx
from mixq.speedup import ModelSpeedup
from mixq.zoo.data import load_cifar10
from mixq.zoo.metrics import median_latency
from mixq.zoo.models import create_model
from mixq.zoo.tutorial import MnistTask, trainer

ALL8 = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Linear"]},
]


def with_weight_bits(config, bits):
    out = []
    for e in config:
        e = copy.deepcopy(e)
        if "weight" in e.get("quant_types", ()):
            e["quant_bits"] = {t: (bits if t == "weight" else 8) for t in e["quant_types"]}
        out.append(e)
    return out


CONFIGS = {
    "lenet": {
        "int8": ALL8,
        # convs and pools float; fc1..fc3 int8 with Q after flatten (measured as the best LeNet placement)
        "mixed": [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}],
    },
    "resnet18_cifar": {
        "int8": [*ALL8, {"quant_types": ["input", "output"], "quant_bits": 8, "op_types": ["AdaptiveAvgPool2d"]}],
        # the 3-channel stem and the classifier stay float
        "mixed": [
            {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
            {"quant_types": ["input", "output"], "quant_bits": 8, "op_types": ["AdaptiveAvgPool2d"]},
            {"exclude": True, "op_names": ["conv1", "relu", "fc"]},
        ],
    },
}


def cpu_info() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in text]
    except (OSError, StopIteration):
        name, flags = platform.processor(), []
    return f"{name}, {torch.get_num_threads()} threads, flags: {' '.join(flags) or 'n/a'}"


def ptq(model, config, calib):
    q = copy.deepcopy(model)
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(q, lambda m: [m(calib[i : i + 64]) for i in range(0, len(calib), 64)])
    return q


def ort_quantize_static(model, calib, input_shape, workdir):
    """ONNX Runtime's own static quantization (QDQ, per-channel, uint8 activations, int8 weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    f = Path(workdir) / "float.onnx"
    export_onnx(model, f, input_shape)
    pre = Path(workdir) / "pre.onnx"
    quant_pre_process(str(f), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + 64].numpy()} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    out = Path(workdir) / "ort_int8.onnx"
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])


def make_runner(kind, obj):
    if kind == "torch":

        def run(x):
            with torch.no_grad():
                return obj(x)
    elif kind == "ort":

        def run(x):
            return torch.from_numpy(obj.run(None, {"input": x.numpy()})[0])
    else:

        def run(x):
            return obj.engine.run(x)

    return run


def bench(runners, x, warmup, runs, rounds):
    """ONNX Runtime variants interleaved in rounds; PyTorch eager timed in its own block afterwards, since
    torch's OpenMP threads keep spinning after each call and would steal the cores from ORT's threads."""
    out = {}
    for phase in (False, True):
        time.sleep(0.5)  # let any spinning thread pool go idle
        group = {k: v for k, v in runners.items() if k.startswith("PyTorch") == phase}
        out.update(median_latency(group, x, warmup, runs, rounds))
    return {name: (t, max(1, runs // rounds) * rounds) for name, t in out.items()}


def agreement(run, ref_model, images):
    with torch.no_grad():
        ref = ref_model(images).argmax(1)
    out = torch.cat([run(images[i : i + 128]) for i in range(0, len(images), 128)]).argmax(1)
    return float((out == ref).float().mean())


def build_variants(name, model, calib, shape, workdir):
    variants = {"PyTorch fp32 (eager)": ("torch", model, None)}
    variants["ORT fp32 (mixq engine)"] = (
        "mixq",
        ModelSpeedup(model, shape, config={}, batchsize=shape[0]).compress(),
        None,
    )
    for label, cfg in (
        ("mixq int8 (8-bit weights)", CONFIGS[name]["int8"]),
        ("mixq int8 (7-bit weights)", with_weight_bits(CONFIGS[name]["int8"], 7)),
        ("mixq mixed (7-bit weights)", with_weight_bits(CONFIGS[name]["mixed"], 7)),
    ):
        q = ptq(model, cfg, calib)
        s = ModelSpeedup(q, shape, batchsize=shape[0]).compress()
        rows = s.report().rows
        n_int8 = sum(r.runs_as == "int8" for r in rows if r.op_type in ("Conv2d", "Linear"))
        n_asked = sum(r.requested == "int8" for r in rows if r.op_type in ("Conv2d", "Linear"))
        note = f"{n_int8}/{n_asked} conv/linear int8, {'uint8' if s.engine.options.uint8_weights else 'int8'} weights"
        variants[label] = ("mixq", s, note)
    variants["ORT quantize_static int8 (QDQ, per-channel)"] = (
        "ort",
        ort_quantize_static(model, calib, shape, workdir),
        "peer",
    )
    return variants


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", nargs="+", default=["lenet", "resnet18_cifar"])
    p.add_argument("--batches", nargs="+", type=int, default=[128, 1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lines = [
        f"machine: {cpu_info()}; {platform.platform()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"mixq {mixq.__version__}",
        f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}",
        "",
    ]
    for name in args.models:
        if name == "lenet":
            task = MnistTask(args.data_dir, seed=0)
            model = create_model("lenet")
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
            trainer(model, opt, F.nll_loss, task.train_loader(0))
            calib, test = task.train_set.tensors[0][:512], task.test_set.tensors[0][:2000]
            shape_rest = (1, 28, 28)
        else:
            model = create_model(name)
            calib = load_cifar10(True, args.data_dir, limit=512).tensors[0]
            test = load_cifar10(False, args.data_dir, limit=1000).tensors[0]
            shape_rest = (3, 32, 32)
        model.eval()
        with tempfile.TemporaryDirectory() as workdir:
            variants = build_variants(name, model, calib, (128, *shape_rest), workdir)
            runners = {label: make_runner(kind, obj) for label, (kind, obj, _) in variants.items()}
            quality = {label: agreement(run, model, test) for label, run in runners.items()}
            results = {}
            for b in args.batches:
                heavy = name != "lenet" and b >= 64
                warmup, runs = (3, 20) if heavy else (20, 200)
                x = test[:b].contiguous()
                results[b] = bench(runners, x, warmup, runs, args.rounds)
                results[b]["_meta"] = (warmup, runs)
        head = (
            "| variant | "
            + " | ".join(f"batch {b} median ms | vs ORT fp32" for b in args.batches)
            + " | top-1 agreement with fp32 | notes |"
        )
        lines += [
            f"### {name}",
            "",
            " ".join(
                f"batch {b}: warm-up {results[b]['_meta'][0]}, {results[b]['_meta'][1]} timed runs "
                f"in {args.rounds} interleaved rounds."
                for b in args.batches
            ),
            "",
            head,
            "|---" * (3 + 2 * len(args.batches)) + "|",
        ]
        for label, (_, _, note) in variants.items():
            cells = []
            for b in args.batches:
                med = results[b][label][0]
                base = results[b]["ORT fp32 (mixq engine)"][0]
                cells.append(f"{med * 1e3:.3f} | {med / base:.2f}")
            lines.append(
                f"| {label} | "
                + " | ".join(cells)
                + f" | {quality[label] * 100:.2f}% ({len(test)} images) | {note or ''} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
