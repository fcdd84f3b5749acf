"""Per-layer timing on the GPU: the int8 conv kernel (as tuned today) vs e4m3 operands loaded straight from an
fp8 NHWC tensor (pipelined wgmma per the TTGIR). ResNet-18 CIFAR layer shapes, b128 and b1024."""
import json, os, sys, time
import torch, mixq, numpy as np
from mixq.backends.cuda import kernels as k
from mixq.backends.cuda.engine import ConvRunner, candidate_configs, time_in_graph, _storage_shape
from mixq.backends.cuda.kernels import KernelConfig
from mixq.backends.cuda.lower import lower
from mixq.export import export_qdq_onnx
from mixq.speedup import all_int8_config
from mixq.zoo.models import create_model
dev = torch.device("cuda")
torch.manual_seed(0)
m = create_model("resnet18_cifar").eval(); x = torch.randn(8, 3, 32, 32)
mixq.prepare_(m, all_int8_config(m), mixq.PTQ(), example_input=x[:1]); mixq.calibrate_(m, lambda mm: mm(x))
q = export_qdq_onnx(mixq.deploy_model(m), (1, 3, 32, 32), mixq.export_calibration(m))
plan = lower(q.model, q.layers)
FP8 = [KernelConfig(*c) for c in [(128,128,64,8,3),(64,128,64,4,4),(64,64,64,4,3),(128,128,128,8,3),(64,128,128,4,3),(128,64,64,4,4),(128,256,64,8,3),(64,64,128,4,3),(128,64,128,8,3)]]
from mixq.backends.cuda.engine import _max_bk, _taps
res = {}
t0 = time.time()
ONLY = int(sys.argv[1]); SKIP = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else set()
convs = [op for op in plan.ops if op.kind == "conv" and not op.x_float and not (op.geometry["kh"] == 1 and op.geometry["h"] == 1)]
if ONLY >= len(convs):
    sys.exit(3)
for op in convs[ONLY:ONLY + 1]:
    max_bn = max(16, k.next_pow2(op.geometry["cout"])); max_bk = _max_bk(op, _taps(op.geometry))
    FP8c = []
    for c in FP8:
        c = KernelConfig(c.bm, min(c.bn, max_bn), min(c.bk, max_bk), c.warps, c.stages)
        if c not in FP8c: FP8c.append(c)
    row = {}
    for mode in ("int8", "fp8"):
        cfgs = [c for c in candidate_configs(op) if c.math == "int8" and not c.persist] if mode == "int8" else FP8c
        for batch in (128, 1024):
            best = (1e9, None)
            for cfg in cfgs:
                tag = f"{mode}:{batch}:{cfg}"
                if tag in SKIP:
                    continue
                print("TRY", tag, flush=True)
                try:
                    r = ConvRunner(op, plan, dev, cfg)
                    env = {}
                    dt = torch.int8
                    if mode == "fp8":
                        r.consts["DOT"] = 3; r.consts["BORDER"] = False; r.dot = 3
                        r.w = r.w.float().to(torch.float8_e4m3fn)
                        if op.sc is not None:
                            r.w2 = r.w2.float().to(torch.float8_e4m3fn)
                        dt = torch.float8_e4m3fn
                    def rnd(tid):
                        t = torch.randint(-100, 100, (batch, *_storage_shape(plan.tensors[tid].shape)), device=dev, dtype=torch.int8)
                        return t
                    env[op.x] = rnd(op.x).to(torch.float32).div(16).to(dt) if mode == "fp8" else rnd(op.x)
                    if op.sc is not None:
                        env[op.sc.x] = rnd(op.sc.x).to(torch.float32).div(16).to(dt) if mode == "fp8" else rnd(op.sc.x)
                    if op.res is not None:
                        env[op.res[0]] = rnd(op.res[0])
                    r(env); torch.cuda.synchronize()
                    us = time_in_graph(lambda: r(env), runs=20)
                    if us < best[0]:
                        best = (us, str(cfg))
                except Exception as e:
                    print("ERR", tag, type(e).__name__, str(e)[:100], flush=True)
                    sys.exit(4)
            row[f"{mode}_b{batch}"] = best
    res[op.node] = row
    print(f"{op.node[-28:]:28s} " + " ".join(f"{k}={v[0]:7.1f}us({v[1]})" for k, v in row.items()), f"t={time.time()-t0:.0f}s", flush=True)
for b in ():
    i = sum(r[f"int8_b{b}"][0] for r in res.values()); f = sum(r[f"fp8_b{b}"][0] for r in res.values())
    print(f"b{b}: sum int8 {i:.1f} us, fp8 {f:.1f} us, ratio {f/i:.3f}")
out = os.environ.get("OUT", "/tmp")
json.dump(res, open(f"{out}/fp8_micro_{ONLY}.json", "w"), indent=1)
