"""The fp8 Q/DQ export run literally by ONNX Runtime (graph optimizations off) against the fake-quant model.

    MIXQ_DATA=../shared/data python benchmarks/fp8_export_parity.py \\
        --out benchmarks/results/fp8-export-parity-cpu.md

Models: the trained CIFAR ResNet-18 (``mixq.zoo.pretrained``) and the tutorial LeNet trained here for one epoch in
fp32 (tutorial recipe), each PTQ-quantized all-fp8 (``mixq.speedup.all_fp8_config``: conv/linear input and weight,
ReLU outputs) with the logits quantized in fp8 too, min/max on 512 training images. What is checked per tensor and
why (src/mixq/zoo/fp8_parity.py): every quantized tensor of the graph is fake_quantize_fp8 of its own input bit
for bit; at an image's first differing quantized tensor every difference is one e4m3 step. Measured: how many images
differ anywhere, top-1 agreement, SQNR over the logits and the largest error at the quantized logits in e4m3 steps (at
the larger magnitude of the two values).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnxruntime
import torch

import mixq
from mixq.export import export_qdq_onnx
from mixq.zoo.data import load_cifar10
from mixq.zoo.fp8_parity import batches_of, compare, logits_fp8_config
from mixq.zoo.models import create_model
from mixq.zoo.pretrained import load_pretrained
from mixq.zoo.tutorial import MnistTask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import cpu_info, publish, run_lines, trained_lenet


def ptq_fp8(model, last: str, calib: torch.Tensor):
    mixq.prepare_(model, logits_fp8_config(model, last), mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(model, lambda m: [m(x) for x in batches_of(calib, 128)])
    return model


def accuracy(model, x, y, batch) -> float:
    with torch.no_grad():
        return float(torch.cat([model(b).argmax(1) for b in batches_of(x, batch)]).eq(y).float().mean())


def section(title, float_model, q, shape, test, labels, random_n, batch, log) -> str:
    log(f"{title}: export")
    qdq = export_qdq_onnx(mixq.deploy_model(q), shape, mixq.export_calibration(q))
    acc_float, acc_fp8 = accuracy(float_model, test, labels, batch), accuracy(q, test, labels, batch)
    torch.manual_seed(1)
    rows = []
    for what, x in ((f"{len(test)} real test images", test), (f"{random_n} random inputs (randn)", None)):
        x = torch.randn(random_n, *shape[1:]) if x is None else x
        log(f"  {what}")
        r = compare(q, qdq, batches_of(x, batch))
        rows.append(
            f"| {what} | {r['qdq_exact']} | {r['first_flips_one_step']} | {r['first_flips']} "
            f"| {r['flipped_images']} ({100 * r['flipped_images'] / r['images']:.1f}%) "
            f"| {100 * r['agreement']:.2f}% | {r['sqnr_db']:.1f} | {r['max_steps']:.1f} "
            f"| {', '.join(r['first_flip_tensors']) or '-'} |"
        )
    return "\n".join(
        [
            f"### {title}",
            "",
            f"accuracy on the real test images: float {100 * acc_float:.2f}%, fp8 fake-quant {100 * acc_fp8:.2f}%; "
            f"batch {batch}",
            "",
            "| inputs | Q/DQ bit-exact | first differences one step | first differences | images differing "
            "| top-1 agreement | logits SQNR dB | max err at logits (e4m3 steps) | where differences start |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cifar-images", type=int, default=1000)
    p.add_argument("--random", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    sections = []
    resnet = load_pretrained("resnet18_cifar")
    train = load_cifar10(True, args.data_dir, limit=512).tensors[0]
    test, labels = load_cifar10(False, args.data_dir, limit=args.cifar_images).tensors
    q = ptq_fp8(load_pretrained("resnet18_cifar"), "fc", train)
    title = "ResNet-18 (CIFAR-10, trained weights), all-fp8 PTQ, logits in fp8"
    sections.append(section(title, resnet, q, (1, 3, 32, 32), test, labels, args.random, 100, log))

    log("LeNet: training one epoch (fp32, tutorial recipe)")
    task = MnistTask(args.data_dir, seed=0)
    lenet = trained_lenet(task)
    q = create_model("lenet")
    q.load_state_dict(lenet.state_dict())
    q = ptq_fp8(q.eval(), "fc3", task.train_set.tensors[0][:512])
    x, y = task.test_set.tensors
    title = "LeNet (MNIST, trained here: 1 epoch fp32, SGD lr 0.01), all-fp8 PTQ, logits in fp8"
    sections.append(section(title, lenet, q, (1, 1, 28, 28), x, y, args.random * 5, 500, log))

    head = [
        "# fp8 Q/DQ export (ONNX Runtime, graph optimizations off) vs the fake-quant model",
        "",
        f"machine: {cpu_info()}",
        f"versions: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
        *run_lines("fp8_export_parity.py", argv or sys.argv[1:], t0),
        "",
        "ONNX Runtime runs the exported graph as written (float8 QuantizeLinear/DequantizeLinear, float conv/gemm). "
        "'Q/DQ bit-exact': every quantized tensor equals fake_quantize_fp8 of its own input. 'first differences "
        "one step': at each image's first quantized tensor that differs from the fake-quant model, every difference "
        "is one e4m3 step (float summation order; src/mixq/zoo/fp8_parity.py). Errors at the logits are in e4m3 "
        "steps at the larger magnitude of the two values (neighbours: 1, or 0.5 across a binade boundary); SQNR over "
        "all logits.",
        "",
    ]
    publish("\n".join(head) + "\n" + "\n".join(sections), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
