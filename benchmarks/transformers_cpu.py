"""Transformers on the CPU (issue 22): torchvision ViT-B/16 (224x224) and a BERT-base-sized encoder
(``nn.TransformerEncoder``: 12 layers, d768, 12 heads, FFN 3072, GELU, sequence 128, float embeddings in), both
with random weights (latency and engine-vs-fake-quant agreement; no accuracy claim).

Rows, every one built from the same float model in this process and timed interleaved in rounds:

- ``ORT fp32``: ONNX Runtime on the float export (ORT_ENABLE_ALL), the baseline of every ratio;
- ``OpenVINO fp32``: OpenVINO on the same float export;
- ``mixq int8: <backend>``: mixq PTQ with every Linear's input and weight int8 (attention projections, MLP,
  head; patch-embedding conv too for the ViT; LayerNorm, Softmax, GELU and the attention matmuls float), on
  ``onnxruntime``, ``openvino`` and ``auto`` (mixq's default backend);
- ``mixq int8 + attention matmuls: <backend>``: the same plus both operands of the attention's two matmuls
  (``op_types: ["MatMul"]``: Q.K^T and P.V, int8 symmetric, mixq's default for them: ``mixq.attention.MatMul``
  modules of ``nn.MultiheadAttention`` models, and of Hugging Face ones through ``mixq.zoo.hf.FromEmbeddings``);
- ``NNCF PTQ -> OpenVINO int8``: ``nncf.quantize`` of the float OpenVINO model with
  ``model_type=nncf.ModelType.TRANSFORMER`` (NNCF's documented setting for transformers), the same calibration
  inputs, compiled with the same OpenVINO settings.

Calibration: 32 random-normal inputs (x1.0; token embeddings ~N(0,1) for the encoder, images ~N(0,1) after
normalisation for the ViT). Quality: SQNR (dB) of each int8 engine against mixq's fake-quant model (mixq rows)
or against the fp32 model (NNCF row, which has no fake-quant model of ours), and top-1 agreement of the
argmax over the last axis, on fresh random inputs (seed 1); beside it the rounding floor, the fake-quant model
in float32 against itself in float64 (``mixq.search.measure.rounding_floor_db``).

    python benchmarks/transformers_cpu.py --out benchmarks/results/transformers-cpu.md

Uses ``torchvision.models.vit_b_16`` where torchvision imports, else the same architecture built from
``mixq.zoo.coverage.TinyViT`` (the table says which); the NNCF row needs ``nncf`` (skipped and said otherwise).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from engines import cpu_info, openvino_session, openvino_version, publish, run_lines

import mixq
from mixq._timing import median_latency
from mixq.export import export_float_onnx
from mixq.search.measure import rounding_floor_db, sqnr_db
from mixq.speedup import ModelSpeedup
from mixq.zoo.coverage import benchmark_transformer as make_model

LINEAR_INT8 = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},  # the ViT's patch embedding
]
ATTENTION_MATMULS = [*LINEAR_INT8, {"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]}]
THREADS = 2


def ort_session(path: Path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def nncf_openvino(path: Path, calib: list[torch.Tensor]):
    """NNCF PTQ of the float OpenVINO model (TRANSFORMER model type), or None without nncf."""
    try:
        import nncf
    except ImportError:
        return None
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    data = nncf.Dataset([x.numpy() for x in calib])
    quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    q_path = path.with_name("nncf_int8.xml")
    ov.save_model(quantized, str(q_path))
    return openvino_session(q_path)


def ptq(model, calib, config):
    q = copy.deepcopy(model)
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib[0])
    mixq.calibrate_(q, lambda m: [m(x) for x in calib])
    return q


def placement(speedup) -> str:
    rows = [r for r in speedup.report().rows if r.requested == "int8"]
    note = f"{sum(r.runs_as in ('int8', 'fused') for r in rows)}/{len(rows)} int8 layers run int8"
    if speedup.selection is not None:
        note += f"; auto chose {speedup.selection.chosen}"
    return note


def quality(run, ref_model, inputs) -> tuple[float, float]:
    with torch.no_grad():
        ref = torch.cat([ref_model(x) for x in inputs])
    out = torch.cat([run(x) for x in inputs])
    agree = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    return sqnr_db(ref, out), agree


def measure_model(name, args, workdir: Path, lines: list[str]) -> None:
    model, sample, what = make_model(name, args.layers)
    build_batch = max(args.batches)
    torch.manual_seed(0)
    calib = [torch.randn(1, *sample) for _ in range(args.calib)]
    torch.manual_seed(1)
    fresh = [torch.randn(build_batch, *sample) for _ in range(2)]
    t0 = time.time()
    float_path = export_float_onnx(model, workdir / f"{name}.onnx", (1, *sample))
    rows = {
        "ORT fp32": (ort_session(float_path), model, "baseline"),
        "OpenVINO fp32": (openvino_session(float_path), model, ""),
    }
    fake_quants = {"mixq int8": ptq(model, calib, LINEAR_INT8)}
    with_matmuls = ptq(model, calib, ATTENTION_MATMULS)
    if any(w.layer_spec.op_type == "MatMul" for w in mixq.quantized_layers(with_matmuls).values()):
        fake_quants["mixq int8 + attention matmuls"] = with_matmuls
    for prefix, fake_quant in fake_quants.items():
        for backend in ("onnxruntime", "openvino", "auto"):
            s = ModelSpeedup(
                fake_quant, (build_batch, *sample), batchsize=build_batch, backend=backend, threads=THREADS
            ).compress()
            rows[f"{prefix}: {backend}" + (" (default)" if backend == "auto" else "")] = (
                s.engine.run,
                fake_quant,
                placement(s),
            )
    peer = nncf_openvino(float_path, calib)
    if peer is not None:
        rows["NNCF PTQ -> OpenVINO int8"] = (peer, model, "peer, SQNR/agreement vs fp32")
    build_s = time.time() - t0

    qual = {label: quality(run, ref, fresh) for label, (run, ref, _) in rows.items()}
    lines += [f"## {name}: {what}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, input {sample}"]
    lines += [f"builds and exports: {build_s:.0f} s; calibration: {args.calib} random inputs", ""]
    for prefix, fake_quant in fake_quants.items():
        fq_db, fq_agree = quality(fake_quant, model, fresh)
        floor = rounding_floor_db(fake_quant, fresh)
        lines += [
            f"- {prefix}: fake-quant model vs fp32 {fq_db:.1f} dB SQNR, {fq_agree:.1%} top-1 agreement (the rows' "
            f"SQNR is vs this fake-quant model); rounding floor {floor:.1f} dB",
        ]
    lines += [
        "",
        "rounding floor: the fake-quant model in float32 vs the same in float64. Float rounding alone moves it this "
        "far (a rounding difference on a quantizer's bin edge flips the bin and the net carries it on), so an engine "
        "summing in another order is not expected above it.",
        "",
    ]
    for batch in sorted(args.batches):
        x = torch.randn(batch, *sample)
        warmup, runs = (3, args.runs) if batch == 1 else (2, max(args.rounds, args.runs // 2))
        runners = {label: run for label, (run, _, _) in rows.items()}
        with torch.no_grad():
            times = median_latency(runners, x, warmup, runs, args.rounds)
        base = times["ORT fp32"]
        calls = max(1, runs // args.rounds) * args.rounds
        lines += [
            f"### batch {batch} (warm-up {warmup}, {calls} timed calls in {args.rounds} interleaved rounds, median)",
            "",
            "| engine | latency | vs ORT fp32 | SQNR | top-1 agreement | note |",
            "|---|---|---|---|---|---|",
        ]
        for label, (_, _, note) in rows.items():
            db, agree = qual[label]
            sq = "-" if label == "ORT fp32" else f"{db:.1f} dB"  # the baseline against itself
            lines.append(
                f"| {label} | {1e3 * times[label]:.1f} ms | {times[label] / base:.2f}x | {sq} | {agree:.1%} | {note} |"
            )
        lines.append("")
        print("\n".join(lines[-len(rows) - 4 :]), flush=True)
    if peer is None:
        lines += ["NNCF row skipped: nncf is not installed.", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_b_16", "bert_base_encoder"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--layers", type=int, default=None, help="keep only this many encoder layers (smoke runs)")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    t0 = time.time()
    try:
        import nncf

        nncf_version = nncf.__version__
    except ImportError:
        nncf_version = "not installed"
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = "not installed"
    lines = [
        "# Transformers on the CPU (benchmarks/transformers_cpu.py)",
        "",
        f"machine: {cpu_info()}; {platform.platform()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, torchvision {tv_version}, "
        f"onnxruntime {ort.__version__}, openvino {openvino_version()}, nncf {nncf_version}, mixq {mixq.__version__}",
        f"threads: {THREADS} (torch, ORT intra-op, OpenVINO INFERENCE_NUM_THREADS via mixq; peers' OpenVINO default)",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            measure_model(name, args, Path(tmp), lines)
    argv_list = sys.argv[1:] if argv is None else argv
    lines += run_lines(Path(__file__).name, argv_list, t0)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
