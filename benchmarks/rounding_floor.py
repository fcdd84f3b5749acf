"""How far float rounding alone moves a quantized model: the rounding floor of engine-vs-fake-quant SQNR.

For each model and precision: PTQ with mixq's all-int8 / all-fp8 config (every conv and Linear; the
transformers: every Linear and the patch conv), calibrated on ``--calib`` random-normal inputs; then, on
``--fresh`` other random inputs, the fake-quant model against fp32 and the fake-quant model in float32 against
the same model in float64 (``mixq.search.measure.rounding_floor_db``). A rounding difference that lands on a
quantizer's bin edge flips the bin, and a deep net carries the flip on, so an engine that sums in another order
than the fake-quant model is not expected above the floor; where an engine's SQNR sits at the floor, it
computes what the fake-quant model computes, up to rounding. Random weights (torchvision's initialisation; the
ResNet's BatchNorm statistics made realistic as in ``gpu_engines.realistic_bn``): the floor depends on them.

    python benchmarks/rounding_floor.py --out benchmarks/results/rounding-floor.md   (needs torchvision)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
from engines import cpu_info, publish, run_lines
from gpu_engines import realistic_bn

import mixq
from mixq.search.measure import rounding_floor_db, sqnr_db
from mixq.speedup import all_fp8_config, all_int8_config
from mixq.zoo.coverage import benchmark_transformer

LINEAR_INT8 = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
]


def build(name: str):
    if name == "resnet50":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()
        realistic_bn(model)
        return model, (3, 224, 224), "torchvision.models.resnet50 (BatchNorm statistics made realistic)"
    model, sample, what = benchmark_transformer(name)
    return model, sample, what


def config(model, name: str, precision: str):
    if name == "resnet50":
        return all_fp8_config(model) if precision == "fp8" else all_int8_config(model)
    return LINEAR_INT8 if precision == "int8" else [{**e, "quant_dtype": "fp8"} for e in LINEAR_INT8]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "bert_base_encoder"])
    p.add_argument("--precisions", nargs="+", default=["int8", "fp8"])
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--fresh", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(2)
    lines = [
        "# Rounding floor of engine-vs-fake-quant SQNR (benchmarks/rounding_floor.py)",
        "",
        f"machine: {cpu_info()}; torch {torch.__version__}, python {platform.python_version()}",
        f"calibration: {args.calib} random-normal inputs; measured on {args.fresh} other random inputs",
        "",
        "| model | precision | fake-quant vs fp32 | rounding floor (fake-quant fp32 vs fp64) |",
        "|---|---|---|---|",
    ]
    for name in args.models:
        model, sample, what = build(name)
        torch.manual_seed(0)
        calib = torch.randn(args.calib, *sample)
        torch.manual_seed(1)
        fresh = list(torch.randn(args.fresh, *sample).split(4))
        for precision in args.precisions:
            q = copy.deepcopy(model)
            mixq.prepare_(q, config(q, name, precision), mixq.PTQ(), example_input=calib[:1])
            batches = calib.split(8)
            with torch.no_grad():
                mixq.calibrate_(q, lambda m, batches=batches: [m(b) for b in batches])
                fq_db = sqnr_db(torch.cat([model(x) for x in fresh]), torch.cat([q(x) for x in fresh]))
            floor = rounding_floor_db(q, fresh)
            lines.append(f"| {name}: {what} | {precision} | {fq_db:.1f} dB | {floor:.1f} dB |")
            print(lines[-1], flush=True)
    lines.append("")
    lines += run_lines(Path(__file__).name, sys.argv[1:] if argv is None else argv, t0)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
