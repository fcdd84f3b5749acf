"""CPU engines on this machine (issue: engines that honor the request): float engines, the peers (ONNX
Runtime's own ``quantize_static``, and OpenVINO running that model), and mixq's engines for the NNI
tutorial-style config (conv/linear input + weight 8 bit, ReLU output 8 bit) with and without
``dummy_input``, on ONNX Runtime, OpenVINO and ``backend="auto"``.

    MIXQ_DATA=../shared/data python benchmarks/engines.py --out benchmarks/results/engines-cpu.md

Every variant runs in one process, interleaved in rounds so that drift of the machine hits all alike; the
table gives the median wall time of one call after warm-up. Weights: LeNet trained here for one epoch in
fp32 on MNIST; ResNet-18 (CIFAR) is the trained model committed in weights/ (94.62% top-1,
benchmarks/results/train-cifar). Every int8 variant, peers included, is calibrated on the same 512 real training
images (min/max); ``quantize_static`` gets ``reduce_range=True`` on CPUs without VNNI (its documented
setting there). Quality: top-1 agreement with the fake-quant PyTorch model (mixq rows) or with the fp32
model (float and peer rows) on real test images. Each batch size gets its own build (``auto`` times its
candidates at the batch it is built for).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F

import mixq
from mixq._io import atomic_write
from mixq.export import export_float_onnx as export_onnx
from mixq.speedup import ModelSpeedup
from mixq.zoo.data import load_cifar10
from mixq.zoo.metrics import median_latency
from mixq.zoo.models import create_model
from mixq.zoo.pretrained import PRETRAINED, load_pretrained
from mixq.zoo.tutorial import MnistTask, trainer

TUTORIAL_STYLE = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]
CONV_OUTPUTS_TOO = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def openvino_version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


def has_vnni() -> bool:
    from mixq.backends.onnxruntime.engine import cpu_has_vnni

    return cpu_has_vnni()


def run_lines(script: str, argv: list[str], t0: float) -> list[str]:
    """Date, commit, command and wall time lines of a benchmark report; the commit line says whether tracked
    files differed from it when the report was written."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    tree = f"{len(changed)} tracked files modified" if changed else "clean tree"
    return [
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit} ({tree})",
        f"command: `MIXQ_DATA=../shared/data python benchmarks/{script} {' '.join(argv)}`",
        f"wall time: {time.time() - t0:.0f} s",
    ]


def publish(text: str, out: str | None) -> None:
    """Print a report and, with ``out``, write it atomically."""
    print(text)
    if out:
        with atomic_write(out, "w") as f:
            f.write(text)


def trained_lenet(task: MnistTask) -> torch.nn.Module:
    """LeNet trained one epoch in fp32 with the tutorial's recipe (seed 0), in eval mode."""
    torch.manual_seed(0)
    lenet = create_model("lenet")
    trainer(lenet, torch.optim.SGD(lenet.parameters(), lr=0.01, momentum=0.5), F.nll_loss, task.train_loader(0))
    return lenet.eval()


def cpu_info() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in text]
    except (OSError, StopIteration):
        name, flags = platform.processor(), []
    return f"{name}, {torch.get_num_threads()} threads, flags: {' '.join(flags) or 'n/a'}"


def ptq(model, config, calib, dummy_input: bool):
    q = copy.deepcopy(model)
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib[:1] if dummy_input else None)
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
        reduce_range=not has_vnni(),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]), out


def openvino_session(onnx_path):
    """OpenVINO on the peer's model: one static-shape compilation per batch size, as mixq's engine does."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    compiled = {}

    def run(x):
        if x.shape[0] not in compiled:
            m = model.clone()
            m.reshape({0: list(x.shape)})
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            compiled[x.shape[0]] = core.compile_model(m, "CPU", config).create_infer_request()
        request = compiled[x.shape[0]]
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def make_runner(kind, obj):
    if kind == "torch":

        def run(x):
            with torch.no_grad():
                return obj(x)
    elif kind == "ort":

        def run(x):
            return torch.from_numpy(obj.run(None, {"input": x.numpy()})[0])
    elif kind == "openvino":
        run = obj
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
        ref = torch.cat([ref_model(images[i : i + 128]) for i in range(0, len(images), 128)]).argmax(1)
    out = torch.cat([run(images[i : i + 128]) for i in range(0, len(images), 128)]).argmax(1)
    return float((out == ref).float().mean())


def placement_note(s) -> str:
    rows = s.report().rows
    n_int8 = sum(r.runs_as == "int8" for r in rows if r.op_type in ("Conv2d", "Linear"))
    n_asked = sum(r.requested == "int8" for r in rows if r.op_type in ("Conv2d", "Linear"))
    note = f"{n_int8}/{n_asked} conv/linear int8" if n_asked else "float engine"
    if s.selection is not None:
        note += f"; auto chose {s.selection.chosen}"
    if getattr(s.engine, "uint8_weights", False):
        note += "; uint8 weights"
    return note


def build_variants(name, model, calib, shape, workdir):
    """{label: (kind, runner object, reference model for agreement, note)}"""
    loader = [calib[i : i + 64] for i in range(0, len(calib), 64)]
    variants = {"PyTorch fp32 (eager)": ("torch", model, model, "")}
    for backend in ("onnxruntime", "openvino"):
        s = ModelSpeedup(model, shape, config={}, batchsize=shape[0], backend=backend).compress()
        variants[f"{backend} fp32 (mixq engine)"] = ("mixq", s, model, "")
    session, path = ort_quantize_static(model, calib, shape, workdir)
    rr = "" if has_vnni() else ", reduce_range"
    variants[f"ORT quantize_static int8 (QDQ, per-channel{rr})"] = ("ort", session, model, "peer")
    variants["OpenVINO running ORT's quantize_static model"] = ("openvino", openvino_session(path), model, "peer")
    configs = {"tutorial-style": TUTORIAL_STYLE}
    if name != "lenet":
        configs["conv outputs quantized too"] = CONV_OUTPUTS_TOO
    for cfg_name, cfg in configs.items():
        for dummy in (True, False) if cfg is TUTORIAL_STYLE else (True,):
            q = ptq(model, cfg, calib, dummy)
            tag = f"mixq {cfg_name}, {'with' if dummy else 'no'} dummy_input"
            runs = [("onnxruntime", None), ("onnxruntime", loader), ("openvino", None), ("auto", loader)]
            if cfg is not TUTORIAL_STYLE or name == "lenet":
                runs = [("onnxruntime", None), ("openvino", None), ("auto", loader)]
            for backend, data in runs:
                s = ModelSpeedup(q, shape, batchsize=shape[0], backend=backend, calib_data_loader=data).compress()
                label = f"{tag}: {backend}" + (" + calibration data" if data is not None and backend != "auto" else "")
                variants[label] = ("mixq", s, q, placement_note(s))
    return variants


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", nargs="+", default=["lenet", "resnet18_cifar"])
    p.add_argument("--batches", nargs="+", type=int, default=[128, 1], help="ResNet-18 runs only batches >= 64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lines = [
        f"machine: {cpu_info()}; {platform.platform()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"openvino {openvino_version()}, mixq {mixq.__version__}",
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
            model = load_pretrained(name) if name in PRETRAINED else create_model(name)
            calib = load_cifar10(True, args.data_dir, limit=512).tensors[0]
            test = load_cifar10(False, args.data_dir, limit=1000).tensors[0]
            shape_rest = (3, 32, 32)
        model.eval()
        for b in args.batches if name == "lenet" else [bb for bb in args.batches if bb >= 64] or args.batches:
            with tempfile.TemporaryDirectory() as workdir:
                # built for this batch: auto times its candidates at the batch it is built for
                variants = build_variants(name, model, calib, (b, *shape_rest), workdir)
                runners = {label: make_runner(kind, obj) for label, (kind, obj, _, _) in variants.items()}
                quality = {label: agreement(runners[label], ref, test) for label, (_, _, ref, _) in variants.items()}
                heavy = name != "lenet" and b >= 64
                warmup, runs = (3, 20) if heavy else (20, 200)
                results = bench(runners, test[:b].contiguous(), warmup, runs, args.rounds)
            base = results["onnxruntime fp32 (mixq engine)"][0]
            lines += [
                f"### {name}, batch {b}",
                "",
                f"warm-up {warmup}, {runs} timed runs in {args.rounds} interleaved rounds; agreement on "
                f"{len(test)} real test images",
                "",
                "| variant | median ms | vs ORT fp32 engine | top-1 agreement | notes |",
                "|---|---|---|---|---|",
            ]
            for label, (_, _, _, note) in variants.items():
                med = results[label][0]
                lines.append(f"| {label} | {med * 1e3:.3f} | {med / base:.2f} | {quality[label] * 100:.2f}% | {note} |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
