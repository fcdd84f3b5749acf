"""The ``mixq`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from ._errors import MixqError

__all__ = ["main"]

DEMO_EXAMPLES = """examples:
  mixq demo --data-dir ../shared/data            # the NNI tutorial end to end, 3 epochs
  mixq demo --data-dir ../shared/data --quick    # small subset, one short epoch (CI)
"""


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def cmd_demo(args) -> int:
    import torch

    from . import __version__
    from .tutorial import MnistTask, compare_fp32_and_qat

    out = Path(args.out)
    train_limit, test_limit = (2000, 1000) if args.quick else (None, None)
    epochs = 1 if args.quick else args.epochs
    task = MnistTask(args.data_dir, train_limit=train_limit, test_limit=test_limit, seed=args.seed)
    progress = _progress_factory(sys.stderr.isatty() and not args.no_progress)
    r = compare_fp32_and_qat(task, epochs=epochs, seed=args.seed, progress_factory=progress)
    calibration = r.quantizer.export_model(out / "mnist_model.pth", out / "mnist_calibration.json")
    rows = [
        ("all in 32bit (fp32 training)", r.fp32_accuracy, sum(r.fp32_epoch_seconds) / epochs),
        ("tutorial config, 8-bit QAT", r.qat_accuracy, sum(r.qat_epoch_seconds) / epochs),
    ]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, mixq {__version__}"
    lines = [
        f"MNIST LeNet, {epochs} epoch(s), {len(task.train_set)} train / {len(task.test_set)} test images, "
        f"seed {args.seed}; {machine}",
        "",
        "| strategy | accuracy | train s/epoch |",
        "|---|---|---|",
        *[f"| {name} | {acc:.2f}% | {sec:.1f} |" for name, acc, sec in rows],
    ]
    table = "\n".join(lines)
    print(table)
    print(f"\nconv1 calibration: {json.dumps(calibration['conv1'])}")
    print(f"\nwrote {out}/mnist_model.pth, {out}/mnist_calibration.json, {out}/results.md, {out}/results.json")
    from ._io import atomic_write

    with atomic_write(out / "results.md", "w") as f:
        f.write(table + "\n")
    with atomic_write(out / "results.json", "w") as f:
        json.dump(
            {
                "machine": machine,
                "epochs": epochs,
                "rows": [{"strategy": n, "accuracy": a, "train_seconds_per_epoch": s} for n, a, s in rows],
            },
            f,
            indent=1,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Mixed-precision quantization that really runs faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="the NNI tutorial end to end on MNIST",
        epilog=DEMO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--data-dir", default=None, help="folder with mnist/ (default: $MIXQ_DATA)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs for fp32 and QAT (default 3)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="2000 train / 1000 test images, one epoch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
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
