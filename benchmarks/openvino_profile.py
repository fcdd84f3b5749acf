"""OpenVINO's own per-node profile of mixq's Q/DQ graph and of NNCF's int8 graph of the same transformer
(issue 22: why mixq's OpenVINO engine was slower than NNCF's with every Linear u8).

The graphs come from the same float model (``mixq.zoo.coverage.benchmark_transformer``, random weights) and
the same 8 random calibration inputs: mixq's Q/DQ graph for each of ``--configs`` (``linear``: every Linear int8;
``linear+matmul``: also both operands of the attention matmuls, int8 symmetric as mixq's default for them;
``linear+matmul-affine``: those operands uint8 affine), the first of them also written as OpenVINO IR and read
back (the form NNCF's graph comes in), and NNCF's. Each is compiled for one static batch on the CPU with the
settings of mixq's engine (LATENCY hint, f32 inference precision, 2 threads) and profiled with ``PERF_COUNT``
over ``--runs`` inferences after 3 warm-up ones, the graphs taking turns. The tables sum OpenVINO's
``real_time`` per (node type, kernel precision) and count the nodes.

``--equal-layer-weights`` gives every encoder layer layer 0's weights, as ``nn.TransformerEncoder``'s deep copy
did before ``BertBaseEncoder`` re-initialised each layer: it shows why mixq's FullyConnected layers looked slower
than NNCF's (see the results files).

    python benchmarks/openvino_profile.py --model bert_base_encoder --runs 30 \
        --configs linear linear+matmul linear+matmul-affine --out benchmarks/results/openvino-profile-amx.md
    python benchmarks/openvino_profile.py --model bert_base_encoder --runs 30 --equal-layer-weights \
        --out benchmarks/results/openvino-profile-equal-weights-amx.md
"""

from __future__ import annotations

import argparse
import collections
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

import mixq
from mixq.export import export_float_onnx
from mixq.speedup import ModelSpeedup
from mixq.zoo.coverage import benchmark_transformer

CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
LINEAR_INT8 = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]
MATMULS = {"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]}
CONFIGS = {
    "linear": LINEAR_INT8,
    "linear+matmul": [*LINEAR_INT8, MATMULS],  # mixq's default for matmuls: int8 symmetric operands
    "linear+matmul-affine": [*LINEAR_INT8, {**MATMULS, "quant_dtype": "uint", "quant_scheme": "per_tensor_affine"}],
}


def profile(core, graphs: dict, shape, runs: int) -> dict:
    """Per graph: (median wall ms per inference, sum of node times, rows), the graphs' inferences interleaved."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    requests = {}
    for label, model in graphs.items():
        model.reshape([*shape])
        requests[label] = core.compile_model(model, "CPU", {**CONFIG, "PERF_COUNT": True}).create_infer_request()
        for _ in range(3):
            requests[label].infer({0: x})
    total = {label: collections.Counter() for label in graphs}
    count = {label: collections.Counter() for label in graphs}
    wall = {label: [] for label in graphs}
    for _ in range(runs):
        for label, request in requests.items():
            t = time.perf_counter()
            request.infer({0: x})
            wall[label].append(1e3 * (time.perf_counter() - t))
            for p in request.profiling_info:
                key = (p.node_type, p.exec_type.rsplit("_", 1)[-1] if p.exec_type else "")
                total[label][key] += p.real_time.total_seconds() * 1e3 / runs
                count[label][key] += 1
    out = {}
    for label in graphs:
        rows = [(k[0], k[1], ms, count[label][k] // runs) for k, ms in total[label].most_common() if ms > 0.005]
        out[label] = (float(np.median(wall[label])), sum(total[label].values()), rows)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert_base_encoder")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["linear"])
    p.add_argument("--equal-layer-weights", action="store_true", help="every encoder layer gets layer 0's weights")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import nncf

    t0 = time.time()
    torch.set_num_threads(2)
    model, sample, what = benchmark_transformer(args.model)
    if args.equal_layer_weights:
        layers = model.encoder.layers
        for layer in layers[1:]:
            layer.load_state_dict(layers[0].state_dict())
        what += ", every layer with layer 0's weights"
    torch.manual_seed(0)
    calib = [torch.randn(1, *sample) for _ in range(8)]
    core = ov.Core()
    shape = (args.batch, *sample)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for i, config in enumerate(args.configs):
            q = copy.deepcopy(model)
            mixq.prepare_(q, CONFIGS[config], mixq.PTQ(), example_input=calib[0])
            mixq.calibrate_(q, lambda m: [m(c) for c in calib])
            speedup = ModelSpeedup(q, shape, batchsize=args.batch, backend="onnxruntime", threads=2).compress()
            onnx.save(speedup.qdq.model, str(Path(tmp) / f"qdq{i}.onnx"))
            graphs[f"mixq Q/DQ ({config})"] = core.read_model(str(Path(tmp) / f"qdq{i}.onnx"))
            if i == 0:
                ov.save_model(graphs[f"mixq Q/DQ ({config})"], str(Path(tmp) / "qdq.xml"), compress_to_fp16=False)
                graphs[f"mixq Q/DQ ({config}), read back from OpenVINO IR"] = core.read_model(
                    str(Path(tmp) / "qdq.xml")
                )
        float_path = export_float_onnx(model, Path(tmp) / "float.onnx", (1, *sample))
        data = nncf.Dataset([c.numpy() for c in calib])
        graphs["NNCF int8"] = nncf.quantize(
            core.read_model(str(float_path)), data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib)
        )
        results = profile(core, graphs, shape, args.runs)
    lines = [
        "# OpenVINO per-node profile: mixq's Q/DQ graph vs NNCF's (benchmarks/openvino_profile.py)",
        "",
        f"machine: {cpu_info()}; OpenVINO {openvino_version()}, nncf {nncf.__version__}, torch {torch.__version__}",
        f"model: {what} ({args.model}), batch {args.batch}, {args.runs} profiled inferences after 3 warm-up; "
        f"settings {CONFIG}; mixq configs: {', '.join(f'{c} = {CONFIGS[c]}' for c in args.configs)}",
        "",
    ]
    for label, (wall, total, rows) in results.items():
        lines += [f"## {label}: {total:.2f} ms per inference (sum of node times), {wall:.2f} ms wall (median)", ""]
        lines += ["| node type | kernel precision | ms per inference | nodes |", "|---|---|---|---|"]
        lines += [f"| {t} | {prec} | {ms:.2f} | {n} |" for t, prec, ms, n in rows]
        lines.append("")
    argv_list = sys.argv[1:] if argv is None else argv
    lines += run_lines(Path(__file__).name, argv_list, t0)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
