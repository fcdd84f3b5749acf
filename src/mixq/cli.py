"""The ``mixq`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys

from ._errors import MixqError

__all__ = ["main"]

DEMO_EXAMPLES = """examples:
  mixq demo --data-dir ../shared/data            # the NNI tutorial end to end, 3 epochs
  mixq demo --data-dir ../shared/data --quick    # small subset, two short epochs (CI)
  mixq demo --backend auto                       # TensorRT where installed, else ONNX Runtime
"""


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def cmd_demo(args) -> int:
    from .demo import DemoOptions, run_demo

    opts = DemoOptions(
        data_dir=args.data_dir, out=args.out, epochs=args.epochs, quick=args.quick, seed=args.seed, backend=args.backend
    )
    run_demo(opts, progress_factory=_progress_factory(sys.stderr.isatty() and not args.no_progress))
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
    demo.add_argument("--quick", action="store_true", help="12000 train / 2000 test images, two epochs, fewer runs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or auto")
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
