"""Train CIFAR-10 ResNet-18 to >= 94.5% in fp32 on one GPU, then QAT fine-tune it for int8.

On the GPU machine (the official batches under DATA/cifar10/cifar-10-batches-py, plain or .xz, checksums
verified by mixq.zoo.data; docs/gpu-data.md says how they get there):

    PYTHONPATH=src python benchmarks/train_cifar.py --data-dir DATA --out OUT

Recipe (fp32 model): all 50k training images, GPU-side augmentation (random crop with 4 pixels of zero
padding, horizontal flip), batch 512, bf16 autocast, channels_last, SGD with Nesterov momentum 0.9 and weight
decay 5e-4, one-cycle to lr 0.2, label smoothing 0.1. The weights are rounded to fp16 (the committed form,
weights/resnet18_cifar.fp16.pt.*) and every number below is measured on the rounded weights.

QAT: each configuration of benchmarks/seed_tables.py (plus the NNI tutorial style) starts from the rounded
fp32 weights and fine-tunes with mixq's QAT (BN folded) in fp32 for --qat-epochs epochs, same augmentation,
cosine from --qat-lr to 0. Accuracy is measured in PyTorch (fake-quant, eval mode) and on an ONNX Runtime
engine built from the exported calibration (on the GPU machine's CPU), with the engine's top-1 agreement.

Writes OUT/resnet18_cifar.fp16.pt.NN (parts under 16 MiB), OUT/cifar_train.json (the seed-table format),
OUT/calib_<i>.json and OUT/train_log.txt.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mixq
from mixq.speedup import ModelSpeedup
from mixq.zoo.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10_arrays
from mixq.zoo.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from seed_tables import cifar_configs

PART_BYTES = 15 * 1024 * 1024


class GpuCifar:
    """The whole data set as uint8 on the device; batches are indexed, augmented and normalized there."""

    def __init__(self, root, train: bool, device, limit: int | None = None):
        images, labels = load_cifar10_arrays(train, root)
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.x = torch.from_numpy(images).to(device)
        self.y = torch.from_numpy(labels).to(device)
        self.padded = F.pad(self.x, (4, 4, 4, 4))  # zero pixels, as torchvision's RandomCrop(padding=4)
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).reshape(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=device).reshape(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.y)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def train_batches(self, batch: int, generator: torch.Generator):
        n, dev = len(self), self.x.device
        order = torch.randperm(n, device=dev, generator=generator)
        ar = torch.arange(32, device=dev)
        for i in range(0, n - batch + 1, batch):
            idx = order[i : i + batch]
            dy = torch.randint(0, 9, (batch,), device=dev, generator=generator)
            dx = torch.randint(0, 9, (batch,), device=dev, generator=generator)
            rows = (dy[:, None] + ar)[:, None, :, None]
            cols = (dx[:, None] + ar)[:, None, None, :]
            x = self.padded[idx[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None], rows, cols]
            flip = torch.rand(batch, device=dev, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            yield self.normalize(x), self.y[idx]

    def test_batches(self, batch: int = 1000):
        for i in range(0, len(self), batch):
            yield self.normalize(self.x[i : i + batch]), self.y[i : i + batch]


def evaluate(model, data: GpuCifar) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in data.test_batches():
            correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / len(data)


def train_float(model, train: GpuCifar, args, log) -> float:
    steps_per_epoch = len(train) // args.batch
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25, anneal_strategy="linear"
    )
    gen = torch.Generator(device=train.x.device).manual_seed(0)
    torch.cuda.synchronize() if train.x.is_cuda else None
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total, n = torch.zeros((), device=train.x.device), 0
        for x, y in train.train_batches(args.batch, gen):
            with torch.autocast(train.x.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
            n += 1
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            elapsed = time.perf_counter() - start
            log(f"fp32 epoch {epoch + 1}/{args.epochs}: loss {float(total) / n:.3f}, {elapsed:.0f} s")
    torch.cuda.synchronize() if train.x.is_cuda else None
    return time.perf_counter() - start


def fine_tune_qat(model, config, train: GpuCifar, args, log, name) -> float:
    mixq.prepare_(model, config, mixq.QAT(), example_input=train.normalize(train.x[:2]))
    steps = args.qat_epochs * (len(train) // args.batch)
    opt = torch.optim.SGD(model.parameters(), lr=args.qat_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator(device=train.x.device).manual_seed(1)
    torch.cuda.synchronize() if train.x.is_cuda else None
    start = time.perf_counter()
    for epoch in range(args.qat_epochs):
        model.train()
        for x, y in train.train_batches(args.batch, gen):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"QAT {name}: epoch {epoch + 1}/{args.qat_epochs}, loss {loss.item():.3f}")
    torch.cuda.synchronize() if train.x.is_cuda else None
    return time.perf_counter() - start


def engine_accuracy(model, test: GpuCifar, quantized: bool) -> tuple[float, float]:
    """(engine accuracy %, top-1 agreement with the PyTorch model %), ONNX Runtime on this machine's CPU."""
    cpu_model = copy.deepcopy(model).cpu().eval()
    shape = (500, 3, 32, 32)
    speedup = ModelSpeedup(
        cpu_model, shape, config=None if quantized else {}, batchsize=shape[0], backend="onnxruntime"
    ).compress()
    correct = agree = 0
    with torch.no_grad():
        for x, y in test.test_batches(shape[0]):
            x = x.contiguous().cpu()
            out, _ = speedup.inference(x)
            ref = cpu_model(x)
            correct += int((out.argmax(1) == y.cpu()).sum())
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
    return 100.0 * correct / len(test), 100.0 * agree / len(test)


def save_fp16_parts(model, out: Path) -> list[str]:
    buf = io.BytesIO()
    torch.save({k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}, buf)
    data, names = buf.getvalue(), []
    for i in range(0, len(data), PART_BYTES):
        name = f"resnet18_cifar.fp16.pt.{i // PART_BYTES:02d}"
        (out / name).write_bytes(data[i : i + PART_BYTES])
        names.append(name)
    return names


def round_to_fp16(model) -> None:
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--qat-epochs", type=int, default=4)
    p.add_argument("--qat-lr", type=float, default=0.005)
    p.add_argument("--qat-configs", nargs="*", default=None, help="names from seed_tables.cifar_configs (default: all)")
    p.add_argument("--train-limit", type=int, default=None, help="smoke tests only")
    p.add_argument("--test-limit", type=int, default=None, help="smoke tests only")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)
        (out / "train_log.txt").write_text("\n".join(log_lines) + "\n")

    device = torch.device(args.device)
    log(f"command: python benchmarks/train_cifar.py {' '.join(sys.argv[1:])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    log(f"machine: {gpu}; torch {torch.__version__}; mixq {mixq.__version__}")
    train = GpuCifar(args.data_dir, True, device, args.train_limit)
    test = GpuCifar(args.data_dir, False, device, args.test_limit)
    log(f"data: {len(train)} training, {len(test)} test images")

    torch.manual_seed(0)
    model = create_model("resnet18_cifar").to(device).to(memory_format=torch.channels_last)
    seconds = train_float(model, train, args, log)
    log(f"fp32 training: {seconds:.1f} s, {args.epochs * (len(train) // args.batch) * args.batch / seconds:.0f} img/s")
    round_to_fp16(model)
    parts = save_fp16_parts(model, out)
    acc_fp32 = evaluate(model, test)
    eng_fp32, agree_fp32 = engine_accuracy(model, test, quantized=False)
    log(f"fp32 (fp16-rounded weights {parts}): PyTorch {acc_fp32:.2f}%, ORT engine {eng_fp32:.2f}%")
    rows = [
        {
            "strategy": "all in 32bit",
            "accuracy_pytorch": acc_fp32,
            "accuracy_engine": eng_fp32,
            "engine_agreement": agree_fp32,
            "train_seconds": seconds,
            "calibration_file": None,
        }
    ]
    configs = {k: v for k, v in cifar_configs().items() if v is not None}
    for i, (name, config) in enumerate(configs.items(), start=1):
        if args.qat_configs is not None and name not in args.qat_configs:
            continue
        q = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        seconds = fine_tune_qat(q, config, train, args, log, name)
        acc = evaluate(q, test)
        q.cpu()
        calib = mixq.export_calibration(q)
        mixq.save_calibration_config(calib, out / f"calib_{i}.json")
        eng, agree = engine_accuracy(q, test, quantized=True)
        rows.append(
            {
                "strategy": name,
                "accuracy_pytorch": acc,
                "accuracy_engine": eng,
                "engine_agreement": agree,
                "train_seconds": seconds,
                "calibration_file": f"calib_{i}.json",
            }
        )
        log(f"{name}: QAT {seconds:.0f} s, PyTorch {acc:.2f}%, engine {eng:.2f}% (agreement {agree:.2f}%)")
    meta = {
        "machine": f"{gpu}; torch {torch.__version__}",
        "train": f"fp32: {len(train)} training images x {args.epochs} epochs, batch {args.batch}, bf16 autocast, "
        f"channels_last, SGD nesterov 0.9 wd 5e-4, one-cycle to lr {args.lr}, label smoothing 0.1, crop+flip, "
        f"seed 0, weights rounded to fp16; QAT: from those weights, {args.qat_epochs} epochs fp32, cosine from "
        f"lr {args.qat_lr}, BN folded",
        "command": f"python benchmarks/train_cifar.py {' '.join(sys.argv[1:])}",
        "test_images": len(test),
        "rows": rows,
    }
    (out / "cifar_train.json").write_text(json.dumps(meta, indent=1))
    log("| strategy | PyTorch | engine | agreement | train s |")
    for r in rows:
        log(
            f"| {r['strategy']} | {r['accuracy_pytorch']:.2f}% | {r['accuracy_engine']:.2f}% | "
            f"{r['engine_agreement']:.2f}% | {r['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
