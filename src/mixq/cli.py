"""The ``mixq`` command line: a thin layer over the library. Errors are one line and exit status 2."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from ._errors import ConfigError, MixqError

__all__ = ["main"]

EXAMPLES = {
    "demo": """examples:
  mixq demo --data-dir ../shared/data            # the NNI tutorial end to end, 3 epochs
  mixq demo --data-dir ../shared/data --quick    # small subset, two short epochs (CI)
  mixq demo --backend auto                       # TensorRT where installed, else ONNX Runtime""",
    "download": """examples:
  mixq download mnist cifar10 --data-dir ~/data  # official files, resumable, checksum-verified""",
    "quantize": """examples:
  mixq quantize --model lenet --config cfg.json --method qat --dataset mnist --epochs 3 --out runs/q
  mixq quantize --model my_net.py:Net --weights fp32.pth --config cfg.yaml --method ptq \\
                --dataset cifar10 --out runs/p
  torchrun --nproc_per_node 2 -m mixq quantize --distributed --model resnet18_cifar --config cfg.json \\
                --dataset cifar10 --epochs 1 --out runs/ddp""",
    "build": """examples:
  mixq build --model lenet --weights runs/q/model.pth --calibration runs/q/calibration.json \\
             --input-shape 128,1,28,28 --out runs/q/lenet.mixq""",
    "bench": """examples:
  mixq bench runs/q/lenet.mixq --batch 1 128 --runs 100""",
    "report": """examples:
  mixq report runs/q/lenet.mixq --profile-batch 128   # placement per layer, with per-layer time
  mixq report runs/demo                              # the tables a demo run wrote""",
    "inspect": """examples:
  mixq inspect runs/q/lenet.mixq
  mixq inspect runs/q/calibration.json""",
}


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 128,1,28,28, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected (batch, ...) with positive sizes, got {text!r}")
    return shape


def load_model(spec: str):
    """A registered example model name, or ``path/to/file.py:Name`` (a class or factory taking no arguments)."""
    from .zoo.models import create_model, list_models

    if ":" not in spec:
        return create_model(spec)
    file, _, attr = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"--model {spec}: file {path} not found (registered models: {list_models()})")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"--model {spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise ConfigError(f"--model {spec}: {path} has no {attr!r}")
    return getattr(module, attr)()


def load_config(path: str) -> list:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: file not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config {p}: cannot parse ({type(e).__name__}: {e})") from e
    return data


def _dataset(name: str, data_dir, train: bool, limit=None):
    from .zoo.data import load_cifar10, load_mnist

    if name == "mnist":
        return load_mnist(train, data_dir, limit)
    if name == "cifar10":
        return load_cifar10(train, data_dir, limit)
    raise ConfigError(f"unknown dataset {name!r}; expected mnist or cifar10")


def cmd_demo(args) -> int:
    from .zoo.demo import DemoOptions, run_demo

    opts = DemoOptions(
        data_dir=args.data_dir, out=args.out, epochs=args.epochs, quick=args.quick, seed=args.seed, backend=args.backend
    )
    run_demo(opts, progress_factory=_progress_factory(sys.stderr.isatty() and not args.no_progress))
    return 0


def cmd_download(args) -> int:
    from .zoo.data import data_dir
    from .zoo.download import download_cifar10, download_mnist

    root = Path(args.data_dir) if args.data_dir else data_dir(None)
    for name in args.datasets:
        path = download_mnist(root) if name == "mnist" else download_cifar10(root)
        print(f"{name}: {path} (checksums verified)")
    return 0


def cmd_quantize(args) -> int:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from .nni import ObserverQuantizer, QAT_Quantizer
    from .zoo.metrics import accuracy

    model = load_model(args.model)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    config = load_config(args.config)
    train = _dataset(args.dataset, args.data_dir, True, args.train_limit)
    test = _dataset(args.dataset, args.data_dir, False, args.test_limit)
    rank, world, device = _init_distributed() if args.distributed else (0, 1, torch.device("cpu"))
    model.to(device)
    example = train.tensors[0][:2].to(device)
    progress = _progress_factory(sys.stderr.isatty() and not args.no_progress and rank == 0)
    torch.manual_seed(args.seed)
    if args.method == "qat":
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        quantizer = QAT_Quantizer(model, config, optimizer, example)
        net = (
            DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            if world > 1
            else model
        )
        sampler = DistributedSampler(train, world, rank, seed=args.seed, drop_last=True) if world > 1 else None
        loss_fn = F.nll_loss if args.model == "lenet" else F.cross_entropy
        for epoch in range(args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = DataLoader(
                train,
                batch_size=args.batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                drop_last=world > 1,
                generator=torch.Generator().manual_seed(epoch),
            )
            bar = progress(total=len(loader), desc=f"QAT epoch {epoch + 1}/{args.epochs}") if progress else None
            net.train()
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(net(x.to(device)), y.to(device)).backward()
                optimizer.step()
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    else:
        import mixq

        model.eval()
        quantizer = ObserverQuantizer(model, config, None, example)
        images = train.tensors[0][: args.calib_images]
        per_rank = len(images) // world // args.batch_size * args.batch_size or len(images) // world
        shard = images[rank * per_rank : (rank + 1) * per_rank]  # equal shards: the same batch count per rank
        mixq.calibrate_(
            model,
            lambda m: [m(shard[i : i + args.batch_size].to(device)) for i in range(0, len(shard), args.batch_size)],
        )
    model.eval().cpu()
    out = Path(args.out)
    quantizer.export_model(out / "model.pth", out / "calibration.json")  # rank 0 writes
    if rank == 0:
        with torch.no_grad():
            acc = accuracy(model, test)
        print(
            f"{args.method} {args.model} on {args.dataset}: fake-quant accuracy {acc:.2f}% "
            f"on {len(test.tensors[0])} test images" + (f" ({world} processes)" if world > 1 else "")
        )
        print(f"wrote {out / 'model.pth'} and {out / 'calibration.json'}")
    if args.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _init_distributed():
    """(rank, world size, device) from torchrun's environment: NCCL on GPUs, gloo on CPUs."""
    import os

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise ConfigError(
            "--distributed needs torchrun: torchrun --nproc_per_node N -m mixq quantize --distributed ..."
        )
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def cmd_build(args) -> int:
    import torch

    from .speedup import ModelSpeedup

    model = load_model(args.model)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.eval()
    speedup = ModelSpeedup(
        model,
        args.input_shape,
        config=args.calibration,
        batchsize=args.input_shape[0],
        backend=args.backend,
        threads=args.threads,
    ).compress()
    path = speedup.export_quantized_model(args.out)
    print(speedup.report())
    print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    import platform

    import torch

    from .backends import load_engine
    from .zoo.metrics import median_latency

    engine = load_engine(args.engine)
    print(f"{args.engine}: backend {engine.backend}; {platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"median of {args.runs} runs after {args.warmup} warm-up, random normal input")
    print("| batch | median ms | per sample us |\n|---|---|---|")
    for b in args.batch:
        x = torch.randn(b, *engine.input_shape[1:])
        t = median_latency({"engine": engine.run}, x, args.warmup, args.runs)["engine"]
        print(f"| {b} | {t * 1e3:.3f} | {t * 1e6 / b:.2f} |")
    return 0


def cmd_report(args) -> int:
    import torch

    from .backends import load_engine
    from .report import PlacementReport

    path = Path(args.path)
    if path.is_dir():
        results = path / "results.md"
        if not results.is_file():
            raise ConfigError(f"{path}: no results.md (run mixq demo --out {path} first)")
        print(results.read_text(encoding="utf-8"))
        return 0
    engine = load_engine(path)
    report = PlacementReport(engine.backend, engine.placement())
    if args.profile_batch:
        x = torch.randn(args.profile_batch, *engine.input_shape[1:])
        report.times = {t.layer: t.microseconds for t in engine.profile(x, args.runs)}
        report.batch = args.profile_batch
    print(report)
    return 0


def cmd_inspect(args) -> int:
    from .backends.base import read_engine_file
    from .calibration import load_calibration_config

    path = Path(args.path)
    if path.suffix in (".json", ".pth", ".pt"):
        config = load_calibration_config(path)
        print(f"{path}: calibration config, {len(config)} layers")
        for name, e in config.items():
            parts = [f"{t}={e[f'{t}_bits']}b" for t in ("input", "weight", "output") if f"{t}_bits" in e]
            extra = f" folded_bn={e['folded_bn']}" if e.get("folded_bn") else ""
            print(f"  {name} ({e.get('op_type', '?')}): {', '.join(parts)}{extra}")
        return 0
    manifest, members = read_engine_file(path)
    print(f"{path}: mixq engine, format {manifest['format_version']}, backend {manifest['backend']}")
    print(f"  input shape {tuple(manifest['input_shape'])} (batch dynamic), max batch {manifest.get('max_batch')}")
    print(f"  members: {', '.join(f'{k} ({len(v)} bytes)' for k, v in members.items())}")
    for name, layer in manifest["layers"].items():
        print(f"  {name} ({layer['op_type']}): {layer['precision']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Mixed-precision quantization that really runs faster.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, func):
        p = sub.add_parser(
            name, help=help_text, epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(func=func)
        return p

    demo = add("demo", "the NNI tutorial end to end on MNIST", cmd_demo)
    demo.add_argument("--data-dir", default=None, help="folder with mnist/ (default: $MIXQ_DATA)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs per strategy (default 3)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="12000 train / 2000 test images, two epochs, fewer runs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or auto")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    dl = add("download", "download MNIST / CIFAR-10 (official files, checksum-verified)", cmd_download)
    dl.add_argument("datasets", nargs="+", choices=["mnist", "cifar10"])
    dl.add_argument("--data-dir", default=None, help="target folder (default: $MIXQ_DATA)")

    q = add("quantize", "QAT or PTQ a model with a config_list, export model + calibration", cmd_quantize)
    q.add_argument("--model", required=True, help="registered name (lenet, resnet18_cifar, ...) or file.py:Name")
    q.add_argument("--weights", help="float state dict to start from")
    q.add_argument("--config", required=True, help="config_list as .json or .yaml")
    q.add_argument("--method", choices=["qat", "ptq"], default="qat")
    q.add_argument("--dataset", choices=["mnist", "cifar10"], required=True)
    q.add_argument("--data-dir", default=None)
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--lr", type=float, default=0.01)
    q.add_argument("--momentum", type=float, default=0.5)
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--calib-images", type=int, default=2048, help="PTQ calibration images (default 2048)")
    q.add_argument("--train-limit", type=int, default=None)
    q.add_argument("--test-limit", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--distributed", action="store_true", help="under torchrun: DDP QAT / sharded PTQ, rank 0 writes")

    b = add("build", "calibration config -> engine file", cmd_build)
    b.add_argument("--model", required=True, help="registered name or file.py:Name")
    b.add_argument("--weights", help="the state dict written by quantize/export_model")
    b.add_argument("--calibration", required=True, help="calibration config (.json or .pth)")
    b.add_argument("--input-shape", type=_shape, required=True, help="e.g. 128,1,28,28 (batch stays dynamic)")
    b.add_argument("--backend", default="onnxruntime")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--out", required=True)

    bench = add("bench", "latency of an engine file", cmd_bench)
    bench.add_argument("engine")
    bench.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    bench.add_argument("--runs", type=int, default=100)
    bench.add_argument("--warmup", type=int, default=10)

    r = add("report", "placement report of an engine, or the tables of a results folder", cmd_report)
    r.add_argument("path")
    r.add_argument("--profile-batch", type=int, default=None, help="also time each layer at this batch")
    r.add_argument("--runs", type=int, default=20)

    i = add("inspect", "what an engine file or calibration config contains", cmd_inspect)
    i.add_argument("path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
