"""The cuda engine through the user's path, fp8 accumulation, and cuBLASLt GEMMs per layer, on one GPU, in one
process (CIFAR ResNet-18 with the trained weights, PTQ on CIFAR-10 test images 0..999, measured on 1000..):

1. ``user_path``: ``mixq.nni.ModelSpeedup(model.cuda(), ..., backend="cuda").inference`` and ``engine.run`` on
   a CUDA batch (and on a CPU batch) against the engine's own timing (``run_device`` under do_bench, and the
   bare graph replay), b128 and b1024. Wall-clock numbers are medians of ``--calls`` synchronized calls.
2. ``auto``: ``mixq.nni.ModelSpeedup`` with its default ``backend="auto"`` on the CUDA model (b128): the
   candidates, the torch fp16 float engine (compiled) and the line ``auto`` prints.
3. ``fp8_accumulation``: the all-fp8 engine with fp32 accumulation across BK chunks (the default now) and with
   the tensor cores' reduced-precision accumulation (``MIXQ_CUDA_FP8_ACC=reduced``): latency, top-1 agreement
   and SQNR against the fake-quant model; then the same for torchvision ResNet-50 (224x224, random weights,
   non-trivial BatchNorm, random-normal calibration/test inputs), with int8 beside it.
4. ``gemm_libraries``: per conv/linear of the int8 ResNet-18 engine, its fused Triton kernel time (profile)
   against the bare GEMM of the same M x N x K through cuBLASLt (``torch._int_mm``, int8 -> int32, and
   ``torch._scaled_mm``, e4m3 -> bf16): no im2col, no epilogue, so a lower bound for that route.

    PYTHONPATH=src MIXQ_DATA=<dir with cifar10/> python benchmarks/gpu_user_path.py --out <dir>
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from gpu_engines import bench, load_models, machine, ptq, realistic_bn, write

from mixq.backends import BuildOptions
from mixq.backends.cuda.engine import ConvRunner, build_engine


def log(msg: str) -> None:
    print(msg, flush=True)


def wall_ms(fn, calls: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` followed by a device synchronize (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def fidelity(engine, fq, x: torch.Tensor) -> dict:
    outs, refs = [], []
    with torch.no_grad():
        for i in range(0, len(x), 250):
            xb = x[i : i + 250].cuda()
            outs.append(engine.run_device(xb).float())
            refs.append(fq(xb).float())
    out, ref = torch.cat(outs), torch.cat(refs)
    return {
        "images": len(x),
        "agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
        "sqnr_db": sqnr_db(ref, out),
    }


def user_path(fp32, calib, test_x, calls: int) -> dict:
    from mixq.nni import ModelSpeedup

    q, _ = ptq(fp32, calib, "int8")
    res = {}
    for batch in (128, 1024):
        sp = ModelSpeedup(q, (batch, 3, 32, 32), batchsize=batch, backend="cuda", onnx_path=None,
                          calibration_cache=None).compress()  # fmt: skip
        engine = sp.engine
        x = test_x[:batch].cuda()
        xc = x.cpu()
        engine.run_device(x)
        graph = engine._graphs[batch].graph
        row = {
            "engine run_device do_bench ms": bench(lambda e=engine, x=x: e.run_device(x, check_finite=False)),
            "graph replay do_bench ms": bench(graph.replay),
            "graph replay wall ms": wall_ms(graph.replay, calls),
            "engine.run(cuda x) wall ms": wall_ms(lambda e=engine, x=x: e.run(x), calls),
            "ModelSpeedup.inference(cuda x) wall ms": wall_ms(lambda s=sp, x=x: s.inference(x), calls),
            "engine.run(cpu x) wall ms": wall_ms(lambda e=engine, x=xc: e.run(x), calls),
            "ModelSpeedup.inference(cpu x) wall ms": wall_ms(lambda s=sp, x=xc: s.inference(x), calls),
        }
        seconds = [sp.inference(x)[1] for _ in range(calls)]
        row["ModelSpeedup.inference(cuda x) own seconds, median ms"] = 1e3 * statistics.median(seconds)
        out, _ = sp.inference(x)
        row["output device (cuda input)"] = str(out.device)
        row["output device (cpu input)"] = str(sp.inference(xc)[0].device)
        base = row["engine run_device do_bench ms"]
        row["inference / run_device"] = row["ModelSpeedup.inference(cuda x) wall ms"] / base
        res[f"b{batch}"] = row
        log(f"user path b{batch}: {json.dumps(row)}")
        del sp, engine
        torch.cuda.empty_cache()
    return res


def auto(fp32, calib, test_x) -> dict:
    from mixq.nni import ModelSpeedup

    q, _ = ptq(fp32, calib, "int8")
    start = time.perf_counter()
    sp = ModelSpeedup(q, (128, 3, 32, 32), batchsize=128, onnx_path=None, calibration_cache=None).compress()
    res = {"seconds": time.perf_counter() - start, "selection": str(sp.selection)}
    res["chosen_engine"] = type(sp.engine).__name__
    log(res["selection"])
    return res


def fp8_accumulation(name: str, fp32, calib, test_x, batches, with_int8: bool) -> dict:
    res = {}
    quantized = {"fp8": ptq(fp32, calib, "fp8")}
    if with_int8:
        quantized["int8"] = ptq(fp32, calib, "int8")
    shape = tuple(calib.shape[1:])
    for batch in batches:
        x = test_x[:batch].cuda()
        for label, prec, acc in (
            ("fp8 acc32", "fp8", "acc32"),
            ("fp8 reduced", "fp8", "reduced"),
            ("int8", "int8", None),
        ):
            if prec not in quantized:
                continue
            fq, qdq = quantized[prec]
            if acc:
                os.environ["MIXQ_CUDA_FP8_ACC"] = acc
            try:
                start = time.perf_counter()
                engine = build_engine(qdq, (batch, *shape), BuildOptions(opt_batch=batch))
                row = {"build_seconds": time.perf_counter() - start}
                engine.run_device(x)
                row["run_device ms"] = bench(lambda e=engine, x=x: e.run_device(x, check_finite=False))
                row.update(fidelity(engine, fq, test_x))
                row["kernels"] = sorted(
                    {r.describe().split("] ")[1] for r in engine.runners if isinstance(r, ConvRunner)}
                )
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            finally:
                os.environ.pop("MIXQ_CUDA_FP8_ACC", None)
            res[f"b{batch} {label}"] = row
            log(f"{name} b{batch} {label}: {json.dumps(row)}")
            torch.cuda.empty_cache()
        m16 = copy.deepcopy(fp32).cuda().eval().half().to(memory_format=torch.channels_last)
        static = x.half().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for _ in range(3):
                m16(static)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                m16(static)
        res[f"b{batch} CUDA-graph fp16 channels-last ms"] = bench(graph.replay)
    return res


def gemm_libraries(fp32, calib, batches) -> dict:
    _, qdq = ptq(fp32, calib, "int8")
    res = {}
    for batch in batches:
        engine = build_engine(qdq, (batch, 3, 32, 32), BuildOptions(opt_batch=batch))
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        times = {t.layer: t.microseconds for t in engine.profile(x, runs=20)}
        rows = []
        for r in engine.runners:
            if not isinstance(r, ConvRunner):
                continue
            g = r.op.geometry
            m, k, n = batch * g["oh"] * g["ow"], g["cin"] * g["kh"] * g["kw"], g["cout"]
            row = {"layer": engine._op_layer(r.op), "m": m, "n": n, "k": k, "triton_fused_us": None}
            row["triton_fused_us"] = times.get(row["layer"])
            if k % 8 == 0 and n % 8 == 0 and m > 16:
                a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
                b = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
                row["int_mm_us"] = 1e3 * bench(lambda a=a, b=b: torch._int_mm(a, b.t()))
                a8, b8 = a.float().div(16).to(torch.float8_e4m3fn), b.float().div(16).to(torch.float8_e4m3fn)
                one = torch.ones((), device="cuda")
                row["scaled_mm_fp8_us"] = 1e3 * bench(
                    lambda a=a8, b=b8, s=one: torch._scaled_mm(a, b.t(), s, s, out_dtype=torch.bfloat16)
                )
            rows.append(row)
        res[f"b{batch}"] = rows
        for row in rows:
            log(f"b{batch} {json.dumps(row)}")
        del engine
        torch.cuda.empty_cache()
    return res


def resnet50():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    realistic_bn(model)
    return model, torch.randn(256, 3, 224, 224), torch.randn(256, 3, 224, 224)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=os.environ.get("MIXQ_DATA"))
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--sections", default="user_path,auto,fp8_accumulation,resnet50,gemm_libraries")
    p.add_argument("--budget-s", type=float, default=520, help="start no section after this many seconds")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.split("\n")
    results = {"machine": machine(), "command": " ".join(sys.argv), "commit": commit or "?",
               "dirty_files": [d for d in dirty if d.strip()], "sections": {}}  # fmt: skip
    log(json.dumps(results["machine"]))
    fp32, calib, test_x, _, note = load_models(args.data_dir)["resnet18"]
    results["resnet18_weights"] = note
    jobs = {
        "user_path": lambda: user_path(fp32, calib, test_x, args.calls),
        "auto": lambda: auto(fp32, calib, test_x),
        "fp8_accumulation": lambda: fp8_accumulation("resnet18", fp32, calib, test_x[:2000], (128, 1024), False),
        "resnet50": lambda: fp8_accumulation("resnet50", *resnet50(), (64,), True),
        "gemm_libraries": lambda: gemm_libraries(fp32, calib, (128, 1024)),
    }
    for name in args.sections.split(","):
        if time.perf_counter() - t0 > args.budget_s:
            results["sections"][name] = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
            continue
        start = time.perf_counter()
        try:
            results["sections"][name] = jobs[name]()
        except Exception as e:
            results["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        results["sections"][name + " seconds"] = time.perf_counter() - start
        write(out / "gpu-user-path.json", json.dumps(results, indent=1, default=str))
    results["seconds"] = time.perf_counter() - t0
    write(out / "gpu-user-path.json", json.dumps(results, indent=1, default=str))
    log(f"done in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
