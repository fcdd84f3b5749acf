"""What ONNX Runtime (CPU) and OpenVINO (CPU) do with the fp8 (e4m3fn) Q/DQ form of docs/fp8-backends.md:
do they load it, run it, match the fp8 math, and how fast.

    python benchmarks/fp8_cpu_backends.py --out benchmarks/results/fp8-cpu-backends.md

Graphs are built with ``onnx.helper`` (opset 19), in the contract's form (helpers/FP8_CONTRACT.md):
activations QuantizeLinear(x, scale, zp=FLOAT8E4M3FN 0) -> DequantizeLinear; weights a FLOAT8E4M3FN
initializer -> DequantizeLinear(axis 0, per-channel scale). The reference is the contract's math in torch:
``(x / scale).clamp(-448, 448).to(float8_e4m3fn).float() * scale``, convolutions in float64.

1. "grid": one Q/DQ pair on every float32 value that matters for the rounding: all 256 fp8 codes' values
   and the midpoints between neighbours (ties, for round-to-nearest-even), +-448 .. 1e6 (saturation),
   subnormals, 0 and -0, and random values; the count of outputs that differ from the reference.
2. "layer": fp8 input Q/DQ + fp8 per-channel weight + Conv + Relu + fp8 output Q/DQ + a Gemm with fp8
   weights; max error against the reference in output steps (the output's scale) on random inputs.
3. latency of 2. against the same graph without Q/DQ (float weights: the dequantized values), median of
   interleaved calls after warm-up, graph optimizations as the backends use them.
4. The trained CIFAR ResNet-18 (``mixq.zoo.pretrained``), fp8 PTQ (``mixq.speedup.all_fp8_config`` plus the
   logits, min/max on 512 training images), through mixq's ONNX Runtime and OpenVINO engines against the
   fake-quant model on real test images and fresh random inputs; latency against the fp32 engines. Needs
   MIXQ_DATA (real CIFAR-10); ``--no-model`` skips it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import mixq
from mixq._io import atomic_write
from mixq._timing import median_latency
from mixq.backends.base import fold_fp8_weights
from mixq.backends.onnxruntime.legalize import FP8_UNSAFE_REWRITES
from mixq.backends.openvino.engine import fp8_initializers_as_raw
from mixq.primitives import fake_quantize_fp8
from mixq.search.measure import sqnr_db

F8 = TensorProto.FLOAT8E4M3FN


def f8_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """A FLOAT8E4M3FN initializer holding ``values`` (already on the fp8 grid)."""
    return helper.make_tensor(name, F8, list(values.shape), values.astype(np.float32).ravel().tolist())


def qdq_nodes(x: str, out: str, scale: str, zp: str, tag: str) -> list:
    return [
        helper.make_node("QuantizeLinear", [x, scale, zp], [f"{tag}_q"], name=f"{tag}/QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zp], [out], name=f"{tag}/DequantizeLinear"),
    ]


def grid_model(scale: float) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        f8_tensor("zp", np.zeros((), np.float32)),
    ]
    graph = helper.make_graph(
        qdq_nodes("x", "y", "s", "zp", "a"),
        "grid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def grid_values() -> np.ndarray:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)].unique()
    mids = (codes[1:] + codes[:-1]) / 2
    extra = torch.tensor([0.0, -0.0, 448, 449, 464, 480, 500, 1e4, 1e6, 2.0**-9, 2.0**-10, 2.0**-11, 3 * 2.0**-11])
    rand = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 100
    v = torch.cat([codes, mids, extra, -extra, rand, mids * 1.0000001, mids * 0.9999999])
    return v.numpy().astype(np.float32)


def layer_model(c_in: int, c_out: int, hw: int, classes: int, float_weights: bool, seed: int = 0):
    """(model, reference function): input Q/DQ -> Conv 3x3 (fp8 weights, per channel) -> Relu -> Q/DQ ->
    Flatten -> Gemm (fp8 weights) -> Q/DQ on the logits. ``float_weights``: the same graph as plain fp32
    (dequantized weights as float initializers, no Q/DQ)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.2
    w2 = torch.randn(classes, c_out * hw * hw, generator=g) * 0.02
    s_w1 = w1.abs().amax(dim=(1, 2, 3)) / 448
    s_w2 = w2.abs().amax(dim=1) / 448
    q_w1 = (w1 / s_w1.view(-1, 1, 1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    q_w2 = (w2 / s_w2.view(-1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    dq_w1, dq_w2 = q_w1 * s_w1.view(-1, 1, 1, 1), q_w2 * s_w2.view(-1, 1)
    s_x, s_h, s_y = 3.0 / 448, 4.0 / 448, 2.0 / 448

    def reference(x: torch.Tensor) -> torch.Tensor:
        # fp8 rounding in float32 (as ONNX and the fake-quant model), the sums in float64
        x = fake_quantize_fp8(x.float(), s_x).double()
        h = torch.nn.functional.conv2d(x, dq_w1.double(), padding=1).relu()
        h = fake_quantize_fp8(h.float(), s_h).double().flatten(1)
        return fake_quantize_fp8((h @ dq_w2.double().T).float(), s_y)

    inits = [numpy_helper.from_array(np.array(s, np.float32), n) for s, n in ((s_x, "sx"), (s_h, "sh"), (s_y, "sy"))]
    inits.append(f8_tensor("zp", np.zeros((), np.float32)))
    if float_weights:
        inits += [numpy_helper.from_array(dq_w1.numpy(), "w1"), numpy_helper.from_array(dq_w2.numpy(), "w2")]
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv/Conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu/Relu"),
            helper.make_node("Flatten", ["r"], ["f"], name="Flatten"),
            helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1, name="fc/Gemm"),
        ]
    else:
        inits += [
            f8_tensor("w1_f8", q_w1.numpy()),
            numpy_helper.from_array(s_w1.numpy(), "w1_s"),
            f8_tensor("w1_zp", np.zeros(c_out, np.float32)),
            f8_tensor("w2_f8", q_w2.numpy()),
            numpy_helper.from_array(s_w2.numpy(), "w2_s"),
            f8_tensor("w2_zp", np.zeros(classes, np.float32)),
        ]
        nodes = [
            *qdq_nodes("x", "xd", "sx", "zp", "in"),
            helper.make_node("DequantizeLinear", ["w1_f8", "w1_s", "w1_zp"], ["w1"], axis=0, name="conv/DQ_w"),
            helper.make_node("Conv", ["xd", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv/Conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu/Relu"),
            *qdq_nodes("r", "rd", "sh", "zp", "relu"),
            helper.make_node("Flatten", ["rd"], ["f"], name="Flatten"),
            helper.make_node("DequantizeLinear", ["w2_f8", "w2_s", "w2_zp"], ["w2"], axis=0, name="fc/DQ_w"),
            helper.make_node("Gemm", ["f", "w2"], ["g"], transB=1, name="fc/Gemm"),
            *qdq_nodes("g", "y", "sy", "zp", "out"),
        ]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model, reference, s_y


def ort_runner(model: onnx.ModelProto, optimize: bool, threads: int, disabled=()):
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    kwargs = {"disabled_optimizers": list(disabled)} if disabled else {}
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], **kwargs)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x)})[0]


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """mixq's CPU legalization of fp8 weights: the float32 values of their DequantizeLinear as initializers."""
    model = copy.deepcopy(model)
    fold_fp8_weights(model)
    return model


def ov_runner(model: onnx.ModelProto, shape, threads: int, raw: bool = False):
    import openvino as ov

    if raw:
        model = copy.deepcopy(model)
        fp8_initializers_as_raw(model)
    core = ov.Core()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(model.SerializeToString())
        m = core.read_model(str(path))
    if shape is not None:
        m.reshape({0: list(shape)})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(m, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return run, compiled


def attempt(fn):
    try:
        return fn(), ""
    except Exception as e:  # we record what each runtime does, whatever it raises
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def ov_runtime_kinds(compiled) -> str:
    seen = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = f"{info['layerType'].astype(str)}({info['runtimePrecision'].astype(str)})"
        if kind not in seen and not kind.startswith(("Input", "Output")):
            seen.append(kind)
    return ", ".join(seen)


def ort_optimized_ops(model: onnx.ModelProto, disabled=()) -> str:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    kwargs = {"disabled_optimizers": list(disabled)} if disabled else {}
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], **kwargs)
        graph = onnx.load(so.optimized_model_filepath).graph
    return ", ".join(n.op_type for n in graph.node)


def torch_runner(run):
    """A numpy runner as a torch one."""
    return lambda x: torch.from_numpy(run(x.numpy()))


def model_section(args) -> list[str]:
    from mixq.backends import BuildOptions, get_backend
    from mixq.export import export_qdq_onnx
    from mixq.speedup import all_fp8_config
    from mixq.zoo.data import load_cifar10
    from mixq.zoo.pretrained import load_pretrained

    resnet = load_pretrained("resnet18_cifar")
    calib = load_cifar10(True, None, limit=512).tensors[0]
    test = load_cifar10(False, None, limit=args.images).tensors[0]
    fresh = torch.randn(args.model_batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    config = [
        *all_fp8_config(resnet),
        {"quant_types": ["output"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": ["fc"]},
    ]
    q = copy.deepcopy(resnet)
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(q, lambda m: [m(calib[i : i + 64]) for i in range(0, len(calib), 64)])
    q.eval()
    calibration = mixq.export_calibration(q)
    scale = float(calibration["fc"]["output_scale"])
    shape = (args.model_batch, 3, 32, 32)
    qdq = export_qdq_onnx(mixq.deploy_model(q), shape, calibration)
    fqdq = export_qdq_onnx(resnet, shape, {})
    options = BuildOptions(threads=args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OpenVINO's fp8 engine warns that it is not exact: the table says so
        built = {
            "ONNX Runtime fp8 (mixq)": get_backend("onnxruntime").build(qdq, shape, options),
            "OpenVINO fp8 (mixq)": get_backend("openvino").build(qdq, shape, options),
            "ONNX Runtime fp32": get_backend("onnxruntime").build(fqdq, shape, options),
            "OpenVINO fp32": get_backend("openvino").build(fqdq, shape, options),
        }
    runners = {k: e.run for k, e in built.items()}
    for name, graph, optimize in (
        ("ORT fp8, every ORT rewrite on (no mixq legalization)", folded(qdq.model), True),
        ("ORT literal (optimizations off)", qdq.model, False),
    ):
        runners[name] = torch_runner(ort_runner(graph, optimize, args.threads))
    notes = {k: ("engine.inexact set" if e.inexact else "") for k, e in built.items()}
    b = args.model_batch

    def batched(run, x):
        with torch.no_grad():
            return torch.cat([run(x[i : i + b]) for i in range(0, len(x), b)])

    ref_real, ref_fresh = batched(q, test), batched(q, fresh)
    lines = [
        "",
        "## 4. ResNet-18 (CIFAR-10, trained weights), all-fp8 PTQ with fp8 logits",
        "",
        f"{len(test)} real test images and {b} random inputs (randn); batch {b}; latency: median of "
        f"{args.model_runs} interleaved calls after 2 warm-up calls; errors in output steps = the logits' fp8 "
        f"scale {scale:.5f} (the e4m3 spacing of logits in [8, 16) x scale; 32 steps near 448 x scale)",
        "",
        "| engine | top-1 agreement | logits bit-equal | SQNR dB | max err (steps) "
        "| random: bit-equal / SQNR / max err | ms | / ORT fp32 | / OpenVINO fp32 | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    quality = {}
    for name, run in runners.items():
        if name.endswith("fp32"):
            continue
        real, rnd = batched(run, test), batched(run, fresh)
        bit_equal = 100 * float((real == ref_real).float().mean())
        random_equal = 100 * float((rnd == ref_fresh).float().mean())
        random_err = float((rnd - ref_fresh).abs().max()) / scale
        quality[name] = (
            f"{100 * float((real.argmax(1) == ref_real.argmax(1)).float().mean()):.2f}% | {bit_equal:.2f}% "
            f"| {sqnr_db(ref_real, real):.1f} | {float((real - ref_real).abs().max()) / scale:.1f} "
            f"| {random_equal:.2f}% / {sqnr_db(ref_fresh, rnd):.1f} / {random_err:.1f}"
        )
    time.sleep(0.5)
    seconds = median_latency(runners, test[:b], warmup=2, runs=args.model_runs, rounds=args.model_runs)
    for name in runners:
        q_cols = quality.get(name, "| | | |")
        lines.append(
            f"| {name} | {q_cols} | {1e3 * seconds[name]:.1f} | {seconds[name] / seconds['ONNX Runtime fp32']:.2f} "
            f"| {seconds[name] / seconds['OpenVINO fp32']:.2f} | {notes.get(name, '')} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--no-model", action="store_true", help="skip section 4 (the trained ResNet-18)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--model-batch", type=int, default=100)
    p.add_argument("--model-runs", type=int, default=7)
    args = p.parse_args()
    import openvino as ov

    lines = ["# fp8 (e4m3fn) Q/DQ on the CPU backends", ""]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines += [
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads",
        f"versions: onnxruntime {ort.__version__}, openvino {ov.__version__.split('-')[0]}, onnx {onnx.__version__}, "
        f"torch {torch.__version__}",
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit} (+ working tree)",
        "command: `python benchmarks/fp8_cpu_backends.py --out benchmarks/results/fp8-cpu-backends.md`",
        "",
        "## 1. One Q/DQ pair on the rounding-critical values",
        "",
    ]
    values = grid_values()
    lines.append(
        f"{values.size} values (every e4m3 value, the midpoints between neighbours and their float32 "
        "neighbours, saturation, subnormals, +-0, 20000 randn*100); scales 1 and 0.37"
    )
    lines += [
        "",
        "| runtime | scale | loads and runs | outputs != reference | != reference rounded through float16 first "
        "| worst case (x: got / want) |",
        "|---|---|---|---|---|---|",
    ]
    for scale in (1.0, 0.37):
        model = grid_model(scale)
        want = fake_quantize_fp8(torch.from_numpy(values), torch.tensor(scale, dtype=torch.float32)).numpy()
        v = (torch.from_numpy(values) / scale).clamp(-448, 448)
        via_f16 = (v.half().to(torch.float8_e4m3fn).float() * scale).numpy()
        for label, make in (
            ("ORT, optimizations off", lambda m=model: ort_runner(m, False, args.threads)),
            ("ORT, all optimizations", lambda m=model: ort_runner(m, True, args.threads)),
            ("OpenVINO", lambda m=model: ov_runner(m, values.shape, args.threads)[0]),
        ):
            run, err = attempt(make)
            got, err2 = (None, err) if run is None else attempt(lambda r=run: r(values))
            if got is None:
                lines.append(f"| {label} | {scale} | no: {err2} | | | |")
                continue
            bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
            worst = ""
            if bad.size:
                i = bad[np.argmax(np.abs(got[bad] - want[bad]))]
                worst = f"{values[i]!r}: {got[i]!r} / {want[i]!r}"
            f16 = int((got.view(np.uint32) != via_f16.view(np.uint32)).sum())
            lines.append(f"| {label} | {scale} | yes | {bad.size} | {f16} | {worst} |")

    lines += ["", "## 2. A conv + gemm with fp8 inputs, weights and outputs", ""]
    shape = (args.batch, 16, 16, 16)
    model, reference, s_y = layer_model(16, 32, 16, 10, float_weights=False)
    fp32_model, _, _ = layer_model(16, 32, 16, 10, float_weights=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    want = reference(x).numpy()
    lines.append(
        f"input {shape} randn; output steps = the logits' fp8 scale {s_y:.5f} (the e4m3 spacing of values in "
        "[8, 16) x scale; 32 steps near 448 x scale)"
    )
    lines += [
        f"latency: median of {args.runs} interleaved calls after {args.warmup} warm-up calls, batch {args.batch}",
        "",
        "| engine | kernels | max err (steps) | values != reference | ms | / same runtime fp32 |",
        "|---|---|---|---|---|---|",
    ]
    runners, rows = {}, {}
    off = FP8_UNSAFE_REWRITES
    for label, make in (
        ("ORT fp32 (no Q/DQ)", lambda: ort_runner(fp32_model, True, args.threads)),
        ("ORT fp8 Q/DQ, optimizations off", lambda: ort_runner(model, False, args.threads)),
        ("ORT fp8 Q/DQ, all optimizations", lambda: ort_runner(model, True, args.threads)),
        (f"ORT fp8 Q/DQ, all optimizations but {off[0]}", lambda: ort_runner(model, True, args.threads, off[:1])),
        (
            f"ORT fp8 Q/DQ, fp8 weights folded, all but {off[0]}",
            lambda: ort_runner(folded(model), True, args.threads, off[:1]),
        ),
        (
            f"ORT fp8 Q/DQ, mixq: fp8 weights folded, all but {', '.join(off)}",
            lambda: ort_runner(folded(model), True, args.threads, off),
        ),
        ("OpenVINO fp32 (no Q/DQ)", lambda: ov_runner(fp32_model, shape, args.threads)),
        ("OpenVINO fp8 Q/DQ, weights in int32_data", lambda: ov_runner(model, shape, args.threads)),
        ("OpenVINO fp8 Q/DQ, weights in raw_data", lambda: ov_runner(model, shape, args.threads, raw=True)),
        ("OpenVINO fp8 Q/DQ, mixq (fp8 weights folded)", lambda: ov_runner(folded(model), shape, args.threads)),
    ):
        made, err = attempt(make)
        if made is None:
            rows[label] = f"| {label} | fails: {err} | | | | |"
            continue
        run, kinds = (made[0], ov_runtime_kinds(made[1])) if isinstance(made, tuple) else (made, "")
        if label.startswith("ORT") and "optimizations off" not in label:
            graph = fp32_model if "fp32" in label else folded(model) if "folded" in label else model
            kinds = ort_optimized_ops(graph, off if "mixq" in label else off[:1] if "but" in label else ())
        elif label.startswith("ORT"):
            kinds = "as written"
        got, err = attempt(lambda r=run: r(x.numpy()))
        if got is None:
            rows[label] = f"| {label} | {kinds} | runs: no: {err} | | | |"
            continue
        runners[label] = lambda xx, r=run: r(xx)
        steps = np.abs(got - want) / s_y
        exact = "" if "fp32" in label else int((got != want).sum())
        rows[label] = (kinds, f"{steps.max():.1f}" if "fp32" not in label else "(not fp8)", exact)
    times = median_latency(runners, x.numpy(), args.warmup, args.runs)
    for label, row in rows.items():
        if isinstance(row, str):
            lines.append(row)
            continue
        base = "ORT fp32 (no Q/DQ)" if label.startswith("ORT") else "OpenVINO fp32 (no Q/DQ)"
        ratio = times[label] / times[base] if base in times else float("nan")
        kinds, err, exact = row
        lines.append(f"| {label} | {kinds} | {err} | {exact} | {times[label] * 1e3:.2f} | {ratio:.2f} |")
    if not args.no_model:
        lines += model_section(args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with atomic_write(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"wall time: {time.perf_counter() - start:.0f} s")
