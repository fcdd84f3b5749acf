"""OpenVINO and ONNX Runtime int8 engines against the fake-quant model on this CPU (u8 x s8 saturation on
x86 CPUs without VNNI, src/mixq/backends/cpu_features.py), and what each way of running OpenVINO costs.

    MIXQ_DATA=../shared/data python benchmarks/openvino_exactness.py \\
        --out benchmarks/results/openvino-exactness-cpu.md

Models: the trained CIFAR ResNet-18 (``mixq.zoo.pretrained``) PTQ-quantized all-int8 in the tutorial style
(conv/linear input + weight, ReLU outputs) with the logits quantized too (so that errors can be counted in
output steps), once with 8-bit and once with 7-bit weights; the tutorial LeNet trained here for one epoch in
fp32 (there are no committed LeNet weights), same config with 8-bit weights. PTQ: min/max on 512 training
images. Quality: top-1 agreement, SQNR (dB, over all logits) and the largest and 99.9th-percentile error in
output steps (the logits' scale) against the fake-quant PyTorch model, on real test images and on one batch
of fresh random inputs; "ORT literal" (ONNX Runtime with graph optimizations off: float Q/DQ and float
conv, the Q/DQ graph executed as written) is the rounding floor of the export itself. Latency: median of one
call after warm-up, every engine of a model interleaved round by round, as a ratio to the fp32 engines.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch

import mixq
from mixq.backends import BuildOptions, get_backend
from mixq.backends.cpu_features import cpu_has_vnni, max_abs_int8_weight
from mixq.backends.openvino.engine import OpenVINOEngine
from mixq.export import export_qdq_onnx
from mixq.zoo.data import load_cifar10
from mixq.zoo.metrics import median_latency
from mixq.zoo.pretrained import load_pretrained
from mixq.zoo.tutorial import MnistTask

sys.path.insert(0, str(Path(__file__).parent))
from engines import cpu_info, openvino_version, publish, run_lines, trained_lenet


def config(weight_bits: int, logits: str) -> list[dict]:
    return [
        {
            "quant_types": ["input", "weight"],
            "quant_bits": {"input": 8, "weight": weight_bits},
            "op_types": ["Conv2d", "Linear"],
        },
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_names": [logits]},
    ]


class AccuracyHintEngine(OpenVINOEngine):
    """OpenVINO's one documented accuracy switch, EXECUTION_MODE_HINT=ACCURACY, on the int8 weights."""

    def _config(self, profiling: bool) -> dict:
        return {**super()._config(profiling), "EXECUTION_MODE_HINT": "ACCURACY"}


def ptq(model, cfg, calib):
    q = copy.deepcopy(model)
    mixq.prepare_(q, cfg, mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(q, lambda m: [m(calib[i : i + 64]) for i in range(0, len(calib), 64)])
    return q.eval()


def ort_literal(qdq):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(qdq.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def engines(q, float_model, shape):
    """{name: (run, note)}: the quantized variants of ``q`` and the fp32 engines of ``float_model``."""
    ov, orb = get_backend("openvino"), get_backend("onnxruntime")
    qdq = export_qdq_onnx(mixq.deploy_model(q), shape, mixq.export_calibration(q))
    fqdq = export_qdq_onnx(float_model, shape, {})
    forced = BuildOptions(uint8_weights=False)
    built = {
        "OpenVINO, int8 weights (before the fix)": ov.build(qdq, shape, forced),
        "OpenVINO, int8 weights, EXECUTION_MODE_HINT=ACCURACY": AccuracyHintEngine(
            qdq.model.SerializeToString(), shape, qdq.layers, forced
        ),
        "OpenVINO, uint8 weights (zero point 128; float kernels)": ov.build(
            qdq, shape, BuildOptions(uint8_weights=True)
        ),
        "OpenVINO, mixq default (weights with |q| > 64 split in two int8 halves)": ov.build(qdq, shape, BuildOptions()),
        "ONNX Runtime, int8 weights forced": orb.build(qdq, shape, forced),
        "ONNX Runtime, mixq default": orb.build(qdq, shape, BuildOptions()),
    }
    out = {}
    for name, e in built.items():
        rows = [r for r in e.placement() if r.op_type in ("Conv2d", "Linear")]
        note = f"{sum(r.runs_as == 'int8' for r in rows)}/{len(rows)} conv/linear int8"
        out[name] = (e.run, note + (", engine.inexact set" if e.inexact else ""))
    out["ORT literal (graph optimizations off)"] = (ort_literal(qdq), "float Q/DQ, float conv")
    out["OpenVINO fp32"] = (ov.build(fqdq, shape, BuildOptions()).run, "float model")
    out["ONNX Runtime fp32"] = (orb.build(fqdq, shape, BuildOptions()).run, "float model")
    return out, max_abs_int8_weight(qdq.model)


def batched(run, images, batch, centre):
    with torch.no_grad():
        out = torch.cat([run(images[i : i + batch]) for i in range(0, len(images), batch)])
    return out - out.mean(1, keepdim=True) if centre else out


def quality(out, ref, scale):
    err = (out - ref).abs() / scale
    sqnr = float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp(min=1e-30)))
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    return agree, sqnr, float(err.max()), float(err.flatten().quantile(0.999))


def measure(title, q, float_model, test, batch, scale, centre, runs, log):
    shape = (batch, *test.shape[1:])
    log(f"{title}: building engines")
    runners, top = engines(q, float_model, shape)
    torch.manual_seed(1)
    fresh = torch.randn(batch, *test.shape[1:])
    ref_real, ref_fresh = batched(q, test, batch, centre), batched(q, fresh, batch, centre)
    rows = []
    for name, (run, note) in runners.items():
        if name.endswith("fp32"):
            rows.append((name, note, None, None))
            continue
        log(f"  quality: {name}")
        real = quality(batched(run, test, batch, centre), ref_real, scale)
        rows.append((name, note, real, quality(batched(run, fresh, batch, centre), ref_fresh, scale)))
    log(f"  timing {len(runners)} engines, {runs} runs each")
    time.sleep(0.5)  # let torch's OpenMP threads go idle before the engines are timed
    seconds = median_latency({k: v[0] for k, v in runners.items()}, test[:batch], warmup=2, runs=runs, rounds=runs)
    ov32, ort32 = seconds["OpenVINO fp32"], seconds["ONNX Runtime fp32"]
    lines = [
        f"### {title}",
        "",
        f"largest |q| of the int8 weights: {top}; {len(test)} real test images and {batch} random inputs "
        f"(randn); batch {batch}; latency: median of {runs} interleaved calls after 2 warm-up calls",
        "",
        "| engine | placement | top-1 agreement | SQNR dB | max err (steps) | p99.9 err (steps) "
        "| random: SQNR dB / max err | ms | / OpenVINO fp32 | / ORT fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, note, real, rnd in rows:
        ms = 1e3 * seconds[name]
        ratios = f"{seconds[name] / ov32:.2f} | {seconds[name] / ort32:.2f}"
        if real is None:
            lines.append(f"| {name} | {note} | | | | | | {ms:.1f} | {ratios} |")
            continue
        a, s, m, p = real
        lines.append(
            f"| {name} | {note} | {100 * a:.2f}% | {s:.1f} | {m:.1f} | {p:.1f} | {rnd[1]:.1f} / {rnd[2]:.1f} "
            f"| {ms:.1f} | {ratios} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cifar-images", type=int, default=1000)
    p.add_argument("--resnet-batch", type=int, default=100)
    p.add_argument("--lenet-batch", type=int, default=500)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    sections = []
    resnet = load_pretrained("resnet18_cifar")
    calib = load_cifar10(True, args.data_dir, limit=512).tensors[0]
    test = load_cifar10(False, args.data_dir, limit=args.cifar_images).tensors[0]
    for bits in (8, 7):
        q = ptq(resnet, config(bits, "fc"), calib)
        scale = float(q.fc.output_quantizer.qparams()[0])
        title = f"ResNet-18 (CIFAR-10, trained weights), all-int8 PTQ, {bits}-bit weights"
        sections.append(measure(title, q, resnet, test, args.resnet_batch, scale, False, args.runs, log))

    log("LeNet: training one epoch (fp32, tutorial recipe)")
    task = MnistTask(args.data_dir, seed=0)
    lenet = trained_lenet(task)
    q = ptq(lenet, config(8, "fc3"), task.train_set.tensors[0][:512])
    scale = float(q.fc3.output_quantizer.qparams()[0])
    title = "LeNet (MNIST, trained here: 1 epoch fp32, SGD lr 0.01), all-int8 PTQ, 8-bit weights"
    sections.append(
        measure(title, q, lenet, task.test_set.tensors[0], args.lenet_batch, scale, True, 5 * args.runs, log)
    )

    import onnxruntime
    import openvino  # noqa: F401

    head = [
        "# OpenVINO and ONNX Runtime int8 engines vs the fake-quant model on this CPU",
        "",
        f"machine: {cpu_info()}; VNNI: {cpu_has_vnni()}",
        f"versions: openvino {openvino_version()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
        *run_lines("openvino_exactness.py", argv or sys.argv[1:], t0),
        "",
        "Errors are in output steps (the quantized logits' scale); SQNR over all logits (LeNet: each row "
        "centred, removing log_softmax's shift). 'int8 weights (before the fix)' is what mixq built before "
        "this change (`BuildOptions(uint8_weights=False)` now). 'mixq default' is `uint8_weights=None`; "
        "on a CPU without VNNI the OpenVINO engine then splits weights with |q| > 64 into two int8 halves "
        "(src/mixq/backends/cpu_features.py: split_int8_weights), the ONNX Runtime engine stores them as uint8.",
        "",
    ]
    publish("\n".join(head) + "\n" + "\n".join(sections), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
