"""The native GPU backend (``cuda``: Triton int8/fp8 kernels, one CUDA graph per batch size) against PyTorch on
the same GPU, in one process: LeNet and CIFAR ResNet-18, all-int8 PTQ (conv/linear input + weight, ReLU
output, the config ``ModelSpeedup(extra_layer_bits=8)`` uses) and, with ``--precisions int8,fp8``, the same
layers all-fp8 (e4m3, ``mixq.speedup.all_fp8_config``), at batch 128 and 1024.

    PYTHONPATH=src MIXQ_DATA=<dir with cifar10/> python benchmarks/gpu_engines.py --out <dir> [--precisions int8,fp8]

Baselines, re-measured in this run: eager fp32 (TF32 off), fp16 channels-last replayed as a CUDA graph, and
``torch.compile(mode="max-autotune")`` fp16 channels-last (Inductor's own CUDA graphs). Every latency is the
median of ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed before each, warm-up and
repetitions in ms as printed) of one call with the input already on the GPU: the engine's ``run_device``
(input copied into the graph's buffer, graph replayed, output cloned), the graph baseline's copy + replay,
a plain call for the others. First the two ceilings (device-to-device copy; int8 and fp16 matrix products,
8192^3) and, per layer of the int8 ResNet engine, FLOPs, bytes and the floor they give against those
ceilings. Quality: the int8 engine against the fake-quant PyTorch model (top-1 agreement, max error) on
real CIFAR-10 test images (images 0..999 calibrate, 1000..9999 are measured), and accuracy against fp32.
ResNet-18 uses the trained weights (``mixq.zoo.pretrained``) when present, else random weights with
non-trivial BatchNorm statistics (the table says which). Writes ``gpu-engines.md`` and ``gpu-engines.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

import mixq
from mixq._io import atomic_write
from mixq.backends import BuildOptions
from mixq.backends.cuda.engine import ConvRunner, build_engine
from mixq.export import export_qdq_onnx
from mixq.speedup import all_int8_config
from mixq.zoo.models import create_model

WARMUP_MS, REP_MS = 25, 200


def bench(fn) -> float:
    """Median milliseconds of one call (do_bench: CUDA events, L2 flushed before each call)."""
    return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def write(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def log(msg: str) -> None:
    print(msg, flush=True)


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        driver = "?"
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def _copy_rate() -> float:
    a = torch.randn(1 << 28, device="cuda")  # 1 GiB of fp32
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / (bench(lambda: b.copy_(a)) * 1e-3)


def _gemm_rate(dtype) -> float:
    m = 8192
    if dtype == torch.int8:
        x = torch.randint(-128, 128, (m, m), device="cuda", dtype=torch.int8)
        w = torch.randint(-128, 128, (m, m), device="cuda", dtype=torch.int8)
        return 2 * m**3 / (bench(lambda: torch._int_mm(x, w)) * 1e-3)
    x, w = torch.randn(m, m, device="cuda", dtype=dtype), torch.randn(m, m, device="cuda", dtype=dtype)
    return 2 * m**3 / (bench(lambda: x @ w) * 1e-3)


def ceilings() -> dict:
    """Measured ceilings: copy bandwidth (bytes read + written), int8 and fp16 GEMM rates on random data."""
    res = {"copy_bytes_per_s": _copy_rate(), "int8_ops_per_s": _gemm_rate(torch.int8)}
    res["fp16_flops_per_s"] = _gemm_rate(torch.float16)
    torch.cuda.empty_cache()
    return res


def realistic_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def load_models(data_dir):
    """{name: (fp32 model, calibration images, test images, test labels or None, weights note)}."""
    out = {}
    torch.manual_seed(0)
    lenet = create_model("lenet").eval()
    out["lenet"] = (lenet, torch.randn(512, 1, 28, 28), torch.randn(2048, 1, 28, 28), None, "random weights")
    test = None
    if data_dir:
        try:
            from mixq.zoo.data import load_cifar10

            test = load_cifar10(train=False, root=data_dir).tensors
        except mixq.MixqError as e:
            log(f"CIFAR-10 not available ({e}); ResNet-18 quality is measured on random inputs")
    try:
        from mixq.zoo.pretrained import load_pretrained

        resnet, note = load_pretrained("resnet18_cifar"), "trained weights (mixq.zoo.pretrained)"
    except (mixq.MixqError, ImportError) as e:
        resnet, note = create_model("resnet18_cifar").eval(), f"random weights ({e})"
        realistic_bn(resnet)
    if test is not None:
        x, y = test
        out["resnet18"] = (resnet, x[:1000], x[1000:], y[1000:], note)
    else:
        out["resnet18"] = (resnet, torch.randn(512, 3, 32, 32), torch.randn(2048, 3, 32, 32), None, note)
    return out


def ptq(model, calib: torch.Tensor, precision: str = "int8"):
    q = copy.deepcopy(model).cuda().eval()
    if precision == "fp8":
        from mixq.speedup import all_fp8_config

        config = all_fp8_config(q)
    else:
        config = all_int8_config(q)
    mixq.prepare_(q, config, mixq.PTQ(), example_input=calib[:1].cuda())
    with torch.no_grad():
        mixq.calibrate_(q, lambda m: [m(b.cuda()) for b in calib.split(256)])
    q.eval()
    qdq = export_qdq_onnx(mixq.deploy_model(q), (1, *calib.shape[1:]), mixq.export_calibration(q))
    return q, qdq


def quality(engine, fq_model, fp32_model, x, y) -> dict:
    agree = n = 0
    correct = {"engine": 0, "fake_quant": 0, "fp32": 0}
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            xb = x[i : i + 500].cuda()
            out = engine.run_device(xb).float()
            ref = fq_model(xb)
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            worst = max(worst, float((out - ref).abs().max()))
            n += len(xb)
            if y is not None:
                yb = y[i : i + 500].cuda()
                correct["engine"] += int((out.argmax(1) == yb).sum())
                correct["fake_quant"] += int((ref.argmax(1) == yb).sum())
                correct["fp32"] += int((fp32_model(xb).argmax(1) == yb).sum())
    res = {"images": n, "agreement": agree / n, "max_abs_error": worst}
    if y is not None:
        res.update({f"accuracy_{k}": v / n for k, v in correct.items()})
    return res


def baselines(model, x: torch.Tensor, compile_ok: bool) -> dict:
    """Eager fp32 (TF32 off), eager TF32, CUDA-graph fp16 channels-last, torch.compile max-autotune fp16
    channels-last (Inductor's own CUDA graphs)."""
    res = {}
    fp32 = copy.deepcopy(model).cuda().eval()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            res["eager fp32"] = bench(lambda: fp32(x))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            res["eager tf32"] = bench(lambda: fp32(x))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    m16 = copy.deepcopy(model).cuda().eval().half().to(memory_format=torch.channels_last)
    static = channels_last(x.half())
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                m16(static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            m16(static)

        def replay():
            static.copy_(x)
            graph.replay()

        res["CUDA-graph fp16 channels-last"] = bench(replay)
        if compile_ok:
            compiled = torch.compile(m16, mode="max-autotune")
            start = time.perf_counter()
            for _ in range(3):
                compiled(static)
            torch.cuda.synchronize()
            res["compile_seconds"] = time.perf_counter() - start
            res["torch.compile max-autotune fp16"] = bench(lambda: compiled(channels_last(x.half())))
    return res


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """An image batch in channels-last memory (what the fp16 baselines run); other inputs as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def int8_peak(ceil: dict) -> float:
    """The int8 rate floors are computed with: the measured int8 GEMM rate, or twice the measured fp16 GEMM
    rate if that is higher (Hopper's int8 peak is twice its fp16 peak; some torch builds run
    ``torch._int_mm`` far below the tensor cores' rate). The larger estimate gives the more demanding floor."""
    return max(ceil["int8_ops_per_s"], 2 * ceil["fp16_flops_per_s"])


def roofline(engine, batch: int, ceil: dict, times: dict) -> list[dict]:
    """Per conv/linear kernel: FLOPs, bytes moved (input, weights, residual, output once each), floor, measured."""
    rows = []
    for r in engine.runners:
        if not isinstance(r, ConvRunner):
            continue
        op, g = r.op, r.op.geometry
        m = batch * g["oh"] * g["ow"]
        k = g["cin"] * g["kh"] * g["kw"]
        flops = 2 * m * g["cout"] * k
        act = 1 if op.mode in ("int8", "fp8") else (2 if op.mode == "fp16" else 4)
        in_bytes = batch * g["cin"] * g["h"] * g["w"] * (4 if op.x_float else act)
        nbytes = in_bytes + op.weight.size * act + m * g["cout"] * (1 if op.out_grid else 4)
        if op.sc is not None:
            sg = op.sc.geometry
            flops += 2 * m * g["cout"] * sg["cin"] * sg["kh"] * sg["kw"]
            nbytes += batch * sg["cin"] * sg["h"] * sg["w"] + op.sc.weight.size
        if op.res is not None:
            nbytes += m * g["cout"] * (1 if op.res[1] is not None else 4)
        peak = int8_peak(ceil) if op.mode in ("int8", "fp8") else ceil["fp16_flops_per_s"]
        t_flop, t_byte = flops / peak * 1e6, nbytes / ceil["copy_bytes_per_s"] * 1e6
        layer = engine._op_layer(op) or op.node
        rows.append({"layer": layer, "kernel": r.describe(), "gflop": flops / 1e9, "mbytes": nbytes / 1e6,
                     "floor_us": max(t_flop, t_byte), "bound": "compute" if t_flop >= t_byte else "memory",
                     "measured_us": times.get(layer)})  # fmt: skip
    return rows


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=os.environ.get("MIXQ_DATA"))
    p.add_argument("--batches", default="128,1024")
    p.add_argument("--models", default="lenet,resnet18")
    p.add_argument("--precisions", default="int8", help="engines to build: int8, fp8 or both (int8,fp8)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-for", default="all", help="model:batch pairs that get the torch.compile baseline")
    p.add_argument("--budget-s", type=float, default=480, help="skip torch.compile once this much time has passed")
    p.add_argument("--render", help="only re-render the report of this gpu-engines.json into --out (no GPU needed)")
    p.add_argument("--compile-from", help="with --render: take missing torch.compile numbers from this run's json")
    args = p.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        other = json.loads(Path(args.compile_from).read_text()) if args.compile_from else None
        text = report(results, results.get("command", "?"), other, args.compile_from)
        write(Path(args.out), text)
        print(text)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = machine()
    log(f"machine: {info}")
    ceil = ceilings()
    log(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, int8 {ceil['int8_ops_per_s'] / 1e12:.0f} TOP/s, "
        f"fp16 {ceil['fp16_flops_per_s'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    results = {"machine": info, "ceilings": ceil, "warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "runs": [],
               "command": " ".join(sys.argv)}  # fmt: skip
    models = load_models(args.data_dir)
    precisions = args.precisions.split(",")
    for name in args.models.split(","):
        fp32, calib, test_x, test_y, note = models[name]
        quantized = {prec: ptq(fp32, calib, prec) for prec in precisions}
        fp32_cuda = copy.deepcopy(fp32).cuda().eval()
        for batch in [int(b) for b in args.batches.split(",")]:
            row = {"model": name, "batch": batch, "weights": note, "engines": {}}
            x = test_x[:batch].cuda() if len(test_x) >= batch else torch.randn(batch, *calib.shape[1:], device="cuda")
            built = {}
            for prec, (fq, qdq) in quantized.items():
                eng = row["engines"][prec] = {}
                try:
                    start = time.perf_counter()
                    engine = build_engine(qdq, (batch, *calib.shape[1:]), BuildOptions(opt_batch=batch))
                    eng["build_seconds"] = time.perf_counter() - start
                    engine.run_device(x)  # capture the graph for this batch
                    eng["run_device"] = bench(lambda e=engine, x=x: e.run_device(x, check_finite=False))
                    eng["replay"] = bench(engine._graphs[batch].graph.replay)
                    if batch == max(int(b) for b in args.batches.split(",")) or name == "lenet":
                        eng["quality"] = quality(engine, fq, fp32_cuda, test_x, test_y)
                    prof = engine.profile(x, runs=20)
                    times = {t.layer: t.microseconds for t in prof}
                    eng["profile_total_us"] = sum(times.values())
                    eng["layers"] = roofline(engine, batch, ceil, times)
                    eng["placement"] = [
                        (r.layer, r.requested, r.runs_as, list(r.kernels), r.note) for r in engine.placement()
                    ]
                    eng["tuning"] = engine.tuning
                    built[prec] = engine
                except Exception as e:  # keep going: the table says what failed
                    import traceback

                    eng["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
            try:
                wanted = args.compile_for == "all" or f"{name}:{batch}" in args.compile_for.split(",")
                compile_ok = wanted and not args.no_compile and time.perf_counter() - t0 < args.budget_s
                row.update(baselines(fp32, x, compile_ok))
            except Exception as e:
                import traceback

                row["baseline_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            for prec, engine in built.items():  # the engines again, after the baselines
                row["engines"][prec]["again"] = bench(lambda e=engine, x=x: e.run_device(x, check_finite=False))
            log(json.dumps({k: v for k, v in row.items() if k != "engines"}, default=str))
            for prec, eng in row["engines"].items():
                log(
                    f"  {prec}: "
                    + json.dumps(
                        {k: v for k, v in eng.items() if k not in ("layers", "placement", "tuning")}, default=str
                    )
                )
            results["runs"].append(row)
            write(out / "gpu-engines.json", json.dumps(results, indent=1, default=str))
            del built
            torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - t0
    write(out / "gpu-engines.json", json.dumps(results, indent=1, default=str))
    write(out / "gpu-engines.md", report(results, " ".join(sys.argv)))
    print(report(results, " ".join(sys.argv)))


COMPILED = "torch.compile max-autotune fp16"


def _engines(r: dict) -> dict:
    """``{precision: engine results}`` of a run row; rows of the int8-only json before --precisions existed
    are read as one int8 engine."""
    if "engines" in r:
        return r["engines"]
    if "error" in r:
        return {"int8": {"error": r["error"]}}
    keys = {"run_device": "cuda int8 (run_device)", "again": "cuda int8 (run_device), again",
            "replay": "cuda int8 graph replay only"}  # fmt: skip
    eng = {new: r.get(old) for new, old in keys.items()}
    eng.update(
        {k: r[k] for k in ("build_seconds", "quality", "profile_total_us", "layers", "placement", "tuning") if k in r}
    )
    return {"int8": eng}


def _recompute_floors(results: dict) -> None:
    """Floors from the stored FLOPs and bytes with :func:`int8_peak` (reports rendered from older json)."""
    c = results["ceilings"]
    for r in results["runs"]:
        for row in (row for eng in _engines(r).values() for row in eng.get("layers", [])):
            rate = (
                int8_peak(c) if "conv int8" in row["kernel"] or "conv fp8" in row["kernel"] else c["fp16_flops_per_s"]
            )
            t_flop, t_byte = row["gflop"] * 1e9 / rate * 1e6, row["mbytes"] * 1e6 / c["copy_bytes_per_s"] * 1e6
            row["floor_us"], row["bound"] = max(t_flop, t_byte), "compute" if t_flop >= t_byte else "memory"


def report(results: dict, command: str, other: dict | None = None, other_name: str | None = None) -> str:
    _recompute_floors(results)
    m, c = results["machine"], results["ceilings"]
    lines = [
        "# Native GPU engine (`cuda` backend) vs PyTorch",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['gpu']} ({m['sms']} SMs, {m['memory_gib']} GiB), driver {m['driver']}, CUDA {m['cuda']}, "
        f"torch {m['torch']}, Triton {m['triton']}, Python {m['python']}.",
        f"Ceilings measured in this run: device copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), int8 "
        f"GEMM 8192^3 {c['int8_ops_per_s'] / 1e12:.0f} TOP/s (`torch._int_mm`), fp16 GEMM "
        f"{c['fp16_flops_per_s'] / 1e12:.0f} TFLOP/s. Floors below use int8 at {int8_peak(c) / 1e12:.0f} TOP/s: "
        "the larger of the measured int8 rate and twice the measured fp16 rate (Hopper's int8 peak is twice its "
        "fp16 peak; its fp8 peak equals its int8 peak, so fp8 layers get the same floor).",
        f"Latency: median of `triton.testing.do_bench` (warm-up {results['warmup_ms']} ms, repetitions "
        f"{results['rep_ms']} ms, L2 flushed before each call), input already on the GPU. Configs: all-int8 PTQ "
        "(`all_int8_config`) and all-fp8 PTQ (`all_fp8_config`, e4m3) where the engine column says fp8; the "
        "baselines are measured once per model and batch, between the engines' first and second timing.",
        "",
        "| model | batch | weights | engine | cuda ms | again | graph replay only | eager fp32 | eager tf32 | "
        "CUDA-graph fp16 CL | torch.compile fp16 | cuda / compiled fp16 | build s | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        comp, mark = r.get(COMPILED), ""
        if comp is None and other is not None:
            same = [o for o in other["runs"] if o["model"] == r["model"] and o["batch"] == r["batch"] and COMPILED in o]
            if same:
                comp, mark = same[0][COMPILED], " *"
        for prec, eng in _engines(r).items():
            if "error" in eng:
                lines.append(f"| {r['model']} | {r['batch']} | {r['weights']} | {prec} | failed: {eng['error']} |")
                continue
            ratio = f"{eng['run_device'] / comp:.2f}x{mark}" if comp else "-"
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['weights']} | {prec} | {fmt_ms(eng['run_device'])} | "
                f"{fmt_ms(eng.get('again'))} | {fmt_ms(eng['replay'])} | "
                f"{fmt_ms(r.get('eager fp32'))} | {fmt_ms(r.get('eager tf32'))} | "
                f"{fmt_ms(r.get('CUDA-graph fp16 channels-last'))} | {fmt_ms(comp)}{mark} | "
                f"{ratio} | {eng['build_seconds']:.0f} | {_seconds(r.get('compile_seconds'))} |"
            )
    if other is not None:
        om = other["machine"]
        lines.append(
            f"\n\\* torch.compile not measured in this run (device time); taken from `{other_name}` ({om['gpu']}, "
            f"driver {om['driver']}, torch {om['torch']}), a run on the same kind of card: compare with care.\n"
        )
    lines += ["", "## Quality (each engine vs its own fake-quant PyTorch model)", "",
              "| model | batch | engine | images | top-1 agreement | max abs logit error | accuracy: engine | "
              "fake-quant | fp32 |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["runs"]:
        for prec, eng in _engines(r).items():
            q = eng.get("quality")
            if not q:
                continue
            acc = [
                f"{100 * q[k]:.2f}%" if k in q else "-"
                for k in ("accuracy_engine", "accuracy_fake_quant", "accuracy_fp32")
            ]
            lines.append(f"| {r['model']} | {r['batch']} | {prec} | {q['images']} | {100 * q['agreement']:.2f}% | "
                         f"{q['max_abs_error']:.4f} | {' | '.join(acc)} |")  # fmt: skip
    for r, prec, eng in ((run, p, e) for run in results["runs"] for p, e in _engines(run).items()):
        if "layers" not in eng:
            continue
        lines += ["", f"## Per layer: {r['model']} batch {r['batch']}, {prec} engine (floor = max(FLOPs / int8 "
                  "ceiling, bytes / copy ceiling); measured: the layer's kernels, each replayed alone as a CUDA graph)",
                  "",
                  "| layer | kernel | GFLOP | MB | floor us | bound | measured us | measured / floor |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in eng["layers"]:
            meas = row["measured_us"]
            gap = f"{meas / row['floor_us']:.1f}x" if meas else "-"
            shown = "-" if meas is None else f"{meas:.1f}"
            lines.append(f"| {row['layer']} | {row['kernel']} | {row['gflop']:.2f} | {row['mbytes']:.1f} | "
                         f"{row['floor_us']:.1f} | {row['bound']} | {shown} | {gap} |")  # fmt: skip
        lines.append(f"\nAll kernels, each alone: {eng['profile_total_us']:.1f} us.")
        slow = sorted((row for row in eng["layers"] if row["measured_us"]), key=lambda row: -row["measured_us"])[:3]
        gaps = ", ".join(f"{row['layer']} {row['measured_us']:.1f} us vs floor {row['floor_us']:.1f} us "
                         f"({row['measured_us'] / row['floor_us']:.1f}x)" for row in slow)  # fmt: skip
        lines.append(f"Three slowest layers: {gaps}.")
    lines.append(f"\nWhole run: {results.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
