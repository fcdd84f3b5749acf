"""The NNI tutorial's two tables, reproduced: MNIST LeNet and CIFAR-10 ResNet-18 (32-bit / mixed / 8-bit).

MNIST (everything on this CPU machine; the same run as `mixq demo`):
    MIXQ_DATA=../shared/data python benchmarks/seed_tables.py mnist --out benchmarks/results/seed-mnist

CIFAR-10 is split, because training ResNet-18 on 2 CPU cores takes hours:
  1. train + accuracy (GPU machine): benchmarks/train_cifar.py trains the fp32 model on all 50k images,
     commits its weights (weights/), QAT fine-tunes every configuration below from them and measures the
     engines' accuracy with ONNX Runtime on that machine's CPU -> benchmarks/results/train-cifar/cifar_train.json
     (the older from-scratch recipe is kept as `cifar-train`)
  2. latency of the same engines on this CPU machine, from the trained fp32 weights calibrated by PTQ on real
     images (the QAT weights stay on the GPU machine; the kernels ONNX Runtime picks do not depend on weight
     values, except the int8/uint8 weight layout, which is the same here):
       python benchmarks/seed_tables.py cifar-latency --accuracy benchmarks/results/train-cifar/cifar_train.json \
           --out benchmarks/results/seed-cifar
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import mixq
from mixq.nni import QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.zoo.data import load_cifar10
from mixq.zoo.metrics import accuracy, average_bits, layer_costs, median_latency
from mixq.zoo.models import create_model
from mixq.zoo.pretrained import load_pretrained


def cifar_configs():
    act = [
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
        {"quant_types": ["input", "output"], "quant_bits": 8, "op_types": ["AdaptiveAvgPool2d"]},
    ]
    conv = {"quant_types": ["input", "weight", "output"], "op_types": ["Conv2d"]}
    # Logits stay float: an EMA-tracked int8 range on the logits clips them while they grow during training
    # and the straight-through estimator then stops their gradient (measured: all-8-bit with quantized logits
    # reached 21.7% where fp32 reached 51.5%). The classifier still runs as QGemm (float output, int32 bias).
    fc = {"quant_types": ["input", "weight"], "op_types": ["Linear"]}
    w7_fc = {"input": 8, "weight": 7}
    w7 = {"input": 8, "weight": 7, "output": 8}
    return {
        "all in 32bit": None,
        "mixed: stem conv + fc float, rest int8 (7-bit weights)": [
            {**conv, "quant_bits": w7},
            *act,
            {"exclude": True, "op_names": ["conv1", "relu", "fc"]},
        ],
        "all in 8bit": [{**conv, "quant_bits": 8}, {**fc, "quant_bits": 8}, *act],
        # NNI's tutorial style: conv/linear inputs and weights, ReLU outputs; conv outputs stay float
        "NNI tutorial style (conv/fc input+weight, ReLU output)": [
            {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
        ],
        "all in 8bit, 7-bit weights": [{**conv, "quant_bits": w7}, {**fc, "quant_bits": w7_fc}, *act],
    }


def cmd_mnist(args):
    from mixq.zoo.demo import DemoOptions, run_demo

    run_demo(DemoOptions(data_dir=args.data_dir, out=args.out, epochs=args.epochs or 3))


def cmd_cifar_train(args):
    device = torch.device(args.device)
    train = load_cifar10(True, args.data_dir, args.train_limit, tuple(args.train_batches))
    test = load_cifar10(False, args.data_dir, args.test_limit)
    torch.manual_seed(0)
    init = create_model("resnet18_cifar")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, config in cifar_configs().items():
        model = copy.deepcopy(init).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        quantizer = QAT_Quantizer(model, config, opt, torch.randn(2, 3, 32, 32, device=device)) if config else None
        start = time.perf_counter()
        for epoch in range(args.epochs):
            model.train()
            loader = DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(epoch))
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            acc_torch = accuracy(lambda x, m=model: m(x.to(device)).cpu(), test)
        model.cpu()
        if quantizer is not None:  # the calibration config comes back; the 45 MB state dict cannot
            quantizer.export_model(out / "model.pth", out / f"calib_{len(rows)}.json")
        speedup = ModelSpeedup(model, (128, 3, 32, 32), config=None if quantizer else {}, batchsize=128).compress()
        acc_engine = accuracy(lambda x, s=speedup: s.inference(x)[0], test)
        rows.append(
            {
                "strategy": name,
                "accuracy_pytorch": acc_torch,
                "accuracy_engine": acc_engine,
                "train_seconds": train_s,
                "calibration_file": f"calib_{len(rows)}.json" if quantizer else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (out / "model.pth").unlink(missing_ok=True)
    meta = {
        "machine": f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}; torch "
        f"{torch.__version__}",
        "train": f"{len(train)} training images (official batches {args.train_batches}) x {args.epochs} epochs, "
        "batch 128, SGD lr 0.05 momentum 0.9 wd 5e-4, "
        "seed 0, same initial weights for every strategy; QAT with BN folding",
        "test_images": len(test),
        "rows": rows,
    }
    (out / "cifar_train.json").write_text(json.dumps(meta, indent=1))


def _openvino_version() -> str:
    try:
        import openvino

        return openvino.__version__
    except ImportError:
        return "not installed"


def cmd_cifar_latency(args):
    import onnxruntime

    trained = json.loads(Path(args.accuracy).read_text()) if args.accuracy else None
    calib_images = load_cifar10(True, args.data_dir, 512).tensors[0]
    x = load_cifar10(False, args.data_dir, 128).tensors[0].contiguous()
    model = load_pretrained("resnet18_cifar")  # the weights the accuracy file was measured from
    costs = layer_costs(model, x[:1])
    engines, bits = {}, {}
    for name, config in cifar_configs().items():
        if config is None:
            engines[name] = ModelSpeedup(model, (128, 3, 32, 32), config={}, batchsize=128).compress()
            bits[name] = average_bits(costs, {})
            continue
        q = copy.deepcopy(model)
        mixq.prepare_(q, config, mixq.PTQ(), example_input=x[:1])
        mixq.calibrate_(q, lambda m: [m(calib_images[i : i + 64]) for i in range(0, 512, 64)])
        engines[name] = ModelSpeedup(q, (128, 3, 32, 32), batchsize=128).compress()
        bits[name] = average_bits(costs, mixq.export_calibration(q))
    latency = median_latency(
        {k: (lambda t, s=s: s.engine.run(t)) for k, s in engines.items()}, x, args.warmup, args.runs
    )
    base = latency["all in 32bit"]
    acc = {r["strategy"]: r for r in trained["rows"]} if trained else {}
    lines = [
        "CIFAR-10 ResNet-18, trained (weights/resnet18_cifar.fp16.pt.*; fp32 and QAT accuracy from "
        "benchmarks/train_cifar.py)",
        f"latency: this machine, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"engines built with backend='auto' (onnxruntime {onnxruntime.__version__}, openvino "
        f"{_openvino_version()}), torch {torch.__version__}; batch 128, "
        f"median of {args.runs} runs after "
        f"{args.warmup} warm-up, interleaved in 5 rounds",
        f"accuracy: {trained['machine']}; {trained['train']}; engine = ONNX Runtime on that machine's CPU, "
        f"{trained['test_images']} test images"
        if trained
        else "accuracy: not measured (no --accuracy file)",
        f"command: python benchmarks/seed_tables.py {' '.join(sys.argv[1:])}",
        "",
        "| strategy | engine (backend='auto') | average bits (MACs / params) | latency ms | vs 32bit | "
        "accuracy (engine) | accuracy (PyTorch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in engines:
        a = acc.get(name, {})
        e = f"{a['accuracy_engine']:.2f}%" if a else "-"
        p = f"{a['accuracy_pytorch']:.2f}%" if a else "-"
        chosen = engines[name].selection.chosen if engines[name].selection else engines[name].backend_name
        lines.append(
            f"| {name} | {chosen} | {bits[name][0]:.2f} / {bits[name][1]:.2f} | {latency[name] * 1e3:.1f} | "
            f"{latency[name] / base:.2f} | {e} | {p} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.md").write_text(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["mnist", "cifar-train", "cifar-latency"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--train-batches", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="official batches 1..5")
    p.add_argument("--accuracy", default=None, help="cifar_train.json from the cifar-train step")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.part == "cifar-train" and args.epochs is None:
        args.epochs = 1
    {"mnist": cmd_mnist, "cifar-train": cmd_cifar_train, "cifar-latency": cmd_cifar_latency}[args.part](args)


if __name__ == "__main__":
    main()
