"""Transformers on one GPU (issue 22): the ViT-B/16 architecture (224x224) and, with ``--models``, a BERT-base-sized
encoder (sequence 128), random weights (seed 0), one batch size (32 by default), in one process.

Baselines (``gpu_engines.baselines``, the same float model with torch's own ``nn.MultiheadAttention``, whose fp16
path runs fused SDPA attention): eager fp32 (TF32 off), eager TF32, fp16 replayed as a CUDA graph, and
``torch.compile(mode="max-autotune")`` fp16, the baseline of every ratio. mixq rows: PTQ with every Linear's
input and weight in int8 (or fp8 e4m3; the ViT's patch-embedding conv too; LayerNorm, Softmax, GELU and the
attention matmuls float), calibrated on ``--calib`` random-normal inputs, exported and built on the ``cuda``
backend at the batch size. Latency: median of ``triton.testing.do_bench`` (CUDA events, L2 flushed) of one
``run_device`` call on a GPU batch. Quality: each engine against its own fake-quant model on ``--fresh`` new
random inputs (SQNR, top-1 agreement); the fake-quant model against fp32. Placement: how many asked layers run in
the asked format. Time split: the engine's ``profile`` (each op replayed alone in a CUDA graph), summed over the
Linear/conv kernels and over the float ops between them. Each precision is built twice, with the float glue (the
ops no layer covers: LayerNorm, GELU, attention, residual adds) in fp32 and in fp16 (``BuildOptions.float_glue``;
fp16 builds also time cuBLASLt against Triton for fp8 GEMMs); beside the SQNR, the rounding floor (the fake-quant
model in float32 vs float64, ``mixq.search.measure.rounding_floor_db``), and for each fp16-glue build the CUDA
kernels that take the most time in one eager forward (torch.profiler).

    PYTHONPATH=src python benchmarks/transformers_gpu.py --out <dir>
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from gpu_engines import REP_MS, WARMUP_MS, baselines, bench, log, machine, write
from gpu_user_path import fidelity, sqnr_db

import mixq
from mixq.backends import BuildOptions
from mixq.backends.cuda.engine import _no_tf32 as no_tf32
from mixq.backends.cuda.engine import build_engine
from mixq.export import export_qdq_onnx
from mixq.search.measure import rounding_floor_db
from mixq.zoo.coverage import benchmark_transformer

LINEAR_INT8 = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},  # the ViT's patch embedding
]


def ptq(model, calib: torch.Tensor, precision: str):
    config = LINEAR_INT8 if precision == "int8" else [{**e, "quant_dtype": "fp8"} for e in LINEAR_INT8]
    q = copy.deepcopy(model).cuda().eval()
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib[:1].cuda())
    with torch.no_grad():
        mixq.calibrate_(q, lambda m: [m(b.cuda()) for b in calib.split(8)])
    qdq = export_qdq_onnx(mixq.deploy_model(q).cpu(), (1, *calib.shape[1:]), mixq.export_calibration(q))
    return q, qdq


def time_split(engine, x: torch.Tensor) -> dict:
    rows = engine.profile(x)
    glue = sum(r.microseconds for r in rows if r.layer == "(glue)")
    layers = sum(r.microseconds for r in rows if r.layer != "(glue)")
    return {
        "layer_kernels_us": layers,
        "float_ops_us": glue,
        "top": [(r.layer, round(r.microseconds, 1)) for r in rows[:6]],
    }


def top_kernels(engine, x: torch.Tensor, count: int = 12) -> list:
    """(kernel, total ms over 5 eager forwards / 5, calls per forward) of the ``count`` costliest CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        engine._forward(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine._forward(x)
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((e.key[:90], us / 5 / 1e3, e.count // 5))
    return sorted(rows, key=lambda r: -r[1])[:count]


def safe_top_kernels(engine, x: torch.Tensor) -> list:
    try:
        return top_kernels(engine, x)
    except Exception as e:  # the profiler is a diagnostic: its failure must not lose the timings
        return [(f"torch.profiler failed: {type(e).__name__}: {e}"[:90], 0.0, 0)]


def measure(name: str, args) -> dict:
    model, sample, what = benchmark_transformer(name, args.layers)
    log(f"== {name}: {what}")
    torch.manual_seed(0)
    calib = torch.randn(args.calib, *sample)
    torch.manual_seed(1)
    fresh = torch.randn(args.fresh, *sample)
    x = torch.randn(args.batch, *sample, device="cuda")
    result = {"model": what, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": args.batch}
    result["baselines_ms"] = baselines(model, x, compile_ok=not args.no_compile)
    log(f"baselines: {result['baselines_ms']}")
    fp32 = copy.deepcopy(model).cuda().eval()
    for precision in args.precisions:
        t0 = time.perf_counter()
        fq, qdq = ptq(model, calib, precision)
        export_s = time.perf_counter() - t0
        with torch.no_grad(), no_tf32():  # the references in true fp32 (cuDNN convs default to TF32)
            ref = torch.cat([fp32(b.cuda()) for b in fresh.split(16)])
            fq_out = torch.cat([fq(b.cuda()) for b in fresh.split(16)])
            floor = rounding_floor_db(fq, [b.cuda() for b in fresh[:32].split(16)])
        asked = set(mixq.quantized_layers(fq))
        for glue in args.glue:
            t1 = time.perf_counter()
            options = BuildOptions(opt_batch=args.batch, float_glue=glue)
            engine = build_engine(qdq, (args.batch, *sample), options, "cuda")
            build_s = time.perf_counter() - t1
            ms = bench(lambda engine=engine: engine.run_device(x))
            fid = fidelity(engine, fq, fresh)
            rows = {r.layer: r for r in engine.placement()}
            runs = sum(rows[layer].runs_as == precision for layer in asked if layer in rows)
            library = sum("cuBLASLt" in " ".join(rows[layer].kernels) for layer in asked if layer in rows)
            key = f"{precision}/{glue}"
            result[key] = {
                "ms": ms, "ptq_export_s": export_s, "build_s": build_s, **fid,
                "fake_quant_vs_fp32_db": sqnr_db(ref, fq_out), "rounding_floor_db": floor,
                "placement": f"{runs}/{len(asked)} asked layers run {precision}"
                + (f" ({library} through cuBLASLt)" if library else ""),
                "split": time_split(engine, x),
                "top_kernels": safe_top_kernels(engine, x) if glue == "fp16" else [],
            }  # fmt: skip
            log(f"{key}: {result[key]}")
            args.checkpoint(name, result)  # the report so far: a run stopped by a time limit keeps every engine
            del engine
            torch.cuda.empty_cache()
    return result


def report(results: dict, command: str) -> str:
    m = results["machine"]
    lines = [
        "# Transformers on the GPU (benchmarks/transformers_gpu.py)",
        "",
        f"machine: {m['gpu']} ({m['sms']} SMs, {m['memory_gib']} GiB), driver {m['driver']}, CUDA {m['cuda']}, "
        f"torch {m['torch']}, triton {m['triton']}, python {m['python']}",
        f"timing: triton.testing.do_bench median (warm-up {WARMUP_MS} ms, repetitions {REP_MS} ms, L2 flushed), "
        "input already on the GPU",
        f"command: `{command}`",
        "",
    ]
    for name, r in results["models"].items():
        base = r["baselines_ms"]
        ref_label = next(k for k in ("torch.compile max-autotune fp16", "CUDA-graph fp16 channels-last") if k in base)
        ref = base[ref_label]
        lines += [f"## {name}: {r['model']}, {r['params_m']:.1f} M parameters, batch {r['batch']}", ""]
        lines += [
            f"| engine | latency | vs {ref_label} | SQNR vs fake-quant | top-1 agreement | note |",
            "|---|---|---|---|---|---|",
        ]
        for label in ("eager fp32", "eager tf32", "CUDA-graph fp16 channels-last", "torch.compile max-autotune fp16"):
            if label in base:
                note = f"compile {base['compile_seconds']:.0f} s" if label.startswith("torch.compile") else ""
                lines.append(f"| {label} | {base[label]:.3f} ms | {base[label] / ref:.2f}x | - | - | {note} |")
        kernels = []
        for key in [k for k in r if "/" in k]:
            precision, glue = key.split("/")
            e = r[key]
            s = e["split"]
            note = (
                f"{e['placement']}; fake-quant vs fp32 {e['fake_quant_vs_fp32_db']:.1f} dB, rounding floor "
                f"{e['rounding_floor_db']:.1f} dB; profile: Linear/conv kernels {s['layer_kernels_us'] / 1e3:.2f} ms, "
                f"float ops {s['float_ops_us'] / 1e3:.2f} ms; build {e['build_s']:.0f} s"
            )
            lines.append(
                f"| mixq cuda {precision}, glue {glue} | {e['ms']:.3f} ms | {e['ms'] / ref:.2f}x | "
                f"{e['sqnr_db']:.1f} dB | {e['agreement']:.1%} ({e['images']} inputs) | {note} |"
            )
            if e["top_kernels"]:
                title = f"Costliest CUDA kernels of the {precision} glue-{glue} engine (one eager forward):"
                kernels += ["", title, ""]
                kernels += ["| kernel | ms per forward | calls |", "|---|---|---|"]
                kernels += [f"| `{k}` | {ms:.3f} | {n} |" for k, ms, n in e["top_kernels"]]
        lines += [*kernels, ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_b_16"])
    p.add_argument("--precisions", nargs="+", default=["int8", "fp8"])
    p.add_argument("--glue", nargs="+", default=["fp32", "fp16"], help="float glue precisions to build")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="keep only this many encoder layers (smoke runs)")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--fresh", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (smoke runs)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = {"machine": machine(), "models": {}}
    command = "python benchmarks/transformers_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def checkpoint(name: str, result: dict) -> str:
        results["models"][name] = result
        text = report(results, command)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            write(out / "transformers-gpu.md", text)
            write(out / "transformers-gpu.json", json.dumps(results, indent=1, default=str))
        return text

    args.checkpoint = checkpoint
    for name in args.models:
        text = checkpoint(name, measure(name, args))
    print(text)


if __name__ == "__main__":
    main()
