"""Which Q/DQ in mixq's export makes OpenVINO keep torchvision ViT-B/16's attention ``out_proj`` in f32 (issue 22).

One encoder layer (``--layers``), every Linear and the patch conv int8 (mixq PTQ, 4 random inputs), exported once;
then three graphs compiled for batch 1 on the CPU (f32 inference precision, 2 threads) and the runtime precision
of every Convolution / FullyConnected listed: the export as it is, the export without the patch conv's input
Q/DQ, and the export with the patch conv's int8 weight DequantizeLinear replaced by the float32 weight it stands
for. Needs torchvision.

    python benchmarks/openvino_placement_probe.py --out benchmarks/results/openvino-placement-probe-amx.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import torch
from engines import cpu_info, openvino_version, publish, run_lines
from onnx import numpy_helper

import mixq
from mixq.speedup import ModelSpeedup
from mixq.zoo.coverage import benchmark_transformer

CONFIG = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
]


def variant(base, kind: str):
    model = copy.deepcopy(base)
    by_output = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    if kind == "without the patch conv's input Q/DQ":
        conv.input[0] = by_output[by_output[conv.input[0]].input[0]].input[0]
    if kind == "with the patch conv's weight as float32":
        dq = by_output[conv.input[1]]
        weight = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32).reshape(-1, 1, 1, 1)
        model.graph.initializer.append(numpy_helper.from_array(weight * scale, "float_weight"))
        conv.input[1] = "float_weight"
    return model


def precisions(core, model, shape) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        onnx.save(model, str(path))
        m = core.read_model(str(path))
    m.reshape([*shape])
    compiled = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "Convolution"):
            parts = [p for p in op.get_friendly_name().split("/") if p]
            rows.append((parts[-2] if len(parts) > 1 else parts[0], info["runtimePrecision"].astype(str)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(2)
    model, sample, what = benchmark_transformer("vit_b_16", args.layers)
    torch.manual_seed(0)
    calib = [torch.randn(1, *sample) for _ in range(4)]
    q = copy.deepcopy(model)
    mixq.prepare_(q, CONFIG, mixq.PTQ(), example_input=calib[0])
    mixq.calibrate_(q, lambda m: [m(c) for c in calib])
    base = ModelSpeedup(q, (1, *sample), batchsize=1, backend="onnxruntime", threads=2).compress().qdq.model
    core = ov.Core()
    kinds = ["as exported", "without the patch conv's input Q/DQ", "with the patch conv's weight as float32"]
    lines = [
        "# OpenVINO runtime precision per layer, three variants of one export (benchmarks/openvino_placement_probe.py)",
        "",
        f"machine: {cpu_info()}; OpenVINO {openvino_version()}, torch {torch.__version__}",
        f"model: {what}, {args.layers} encoder layer(s), batch 1, every Linear and the patch conv int8",
        "",
        "| graph | " + " | ".join(name for name, _ in precisions(core, base, (1, *sample))) + " |",
    ]
    lines.append("|---" * (lines[-1].count("|") - 1) + "|")
    for kind in kinds:
        rows = precisions(core, variant(base, kind), (1, *sample))
        lines.append(f"| {kind} | " + " | ".join(prec for _, prec in rows) + " |")
        print(lines[-1], flush=True)
    lines.append("")
    lines += run_lines(Path(__file__).name, sys.argv[1:] if argv is None else argv, t0)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
