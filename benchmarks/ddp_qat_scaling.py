"""QAT throughput of CIFAR-10 ResNet-18 under DistributedDataParallel, 1 vs N GPUs (NCCL).

    torchrun --standalone --nproc_per_node 1 benchmarks/ddp_qat_scaling.py --out r1.json
    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_qat_scaling.py --out r2.json
    ... [--amp] [--compile MODE] [--float] [--range-sync per-observer] [--broadcast-buffers]

Per-GPU batch is fixed (weak scaling). The data set (50k synthetic CIFAR-shaped images, the same on every rank)
lives on the GPU and each rank indexes whole batches of its shard of a per-epoch permutation there, so no CPU
DataLoader (per-sample indexing and collation) limits the rate. --amp trains under bf16 autocast with
channels_last; --compile MODE compiles the model before DDP wraps it (DDP(torch.compile(model, mode=MODE));
"default", "reduce-overhead", "max-autotune-no-cudagraphs"); --float trains the float model (no QAT) for the same
data-parallel baseline. Range sync: "deferred" (mixq's default under torch.distributed: one all-reduce of every
activation range per step, mixq.quantization.sync) or "per-observer" (each EMA observer all-reduces as it observes,
the previous behaviour). --grad-bf16 sends gradients in bf16. DDP's broadcast_buffers is off unless --broadcast-
buffers: mixq's observer states are identical on all ranks by construction, and export folds rank 0's BatchNorm
statistics. Images/s = world * batch * timed steps / seconds, timed after warm-up with CUDA synchronisation; the
first warm-up step's time (compilation) is reported separately. At the end every rank exports its calibration
config and rank 0 checks that all ranks' configs are identical. Errors are written to --out, not lost.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import mixq
from mixq.nni import QAT_Quantizer
from mixq.quantization.sync import undefer_range_sync_
from mixq.zoo.models import create_model

CONFIG = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256, help="per GPU")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last")
    p.add_argument("--compile", metavar="MODE", default=None, help="torch.compile the model with this mode, then wrap")
    p.add_argument("--float", action="store_true", help="float training, no QAT (the DDP baseline)")
    p.add_argument("--range-sync", choices=["deferred", "per-observer"], default="deferred")
    p.add_argument("--broadcast-buffers", action="store_true")
    p.add_argument("--grad-bf16", action="store_true", help="all-reduce gradients in bf16 (DDP's bf16_compress_hook)")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU: a smoke test of this script, not a benchmark")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = run(args, rank, world)
    except Exception:
        result = {"error": traceback.format_exc(), "rank": rank}
        print(result["error"], flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        failed = [g for g in gathered if "error" in g]
        out = failed[0] if failed else gathered[0]
        out = {**out, "args": vars(args), "gpus": world}
        if not failed:
            out["configs_identical_across_ranks"] = all(g["config"] == gathered[0]["config"] for g in gathered)
        out.pop("config", None)
        print(json.dumps({k: v for k, v in out.items() if k != "error"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()


def run(args, rank: int, world: int) -> dict:
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    synchronize = (lambda: None) if args.cpu else torch.cuda.synchronize
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.images, 3, 32, 32, device=device, generator=gen)
    labels = torch.randint(0, 10, (args.images,), device=device, generator=gen)
    torch.manual_seed(0)
    model = create_model("resnet18_cifar").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    quantizer = None
    if not args.float:
        quantizer = QAT_Quantizer(model, CONFIG, opt, torch.randn(2, 3, 32, 32, device=device))
        if args.range_sync == "per-observer":
            undefer_range_sync_(model)
    if args.amp:
        model.to(memory_format=torch.channels_last)
    # Compile the model, then wrap it: torch.compile(ddp) splits the graph at DDP's bucket boundaries, and a
    # split can save a BatchNorm's running_var for the backward of one piece while the next piece updates it in
    # place (seen on two H200: "modified by an inplace operation", benchmarks/results/ddp/).
    inner = model
    if args.compile:
        torch._dynamo.config.optimize_ddp = False  # see above: one graph per forward, no split at buckets
        inner = torch.compile(model, mode=args.compile)
    ddp = DDP(inner, device_ids=None if args.cpu else [local], broadcast_buffers=args.broadcast_buffers)
    if args.grad_bf16:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    step, t0, epoch, first_step_s = 0, None, 0, None
    ddp.train()
    while step < args.warmup + args.steps:
        order = torch.randperm(args.images, device=device, generator=torch.Generator(device=device).manual_seed(epoch))
        shard = order[rank::world]
        for i in range(0, len(shard) - args.batch + 1, args.batch):
            if step == args.warmup:
                synchronize()
                dist.barrier()
                t0 = time.perf_counter()
            t_step = time.perf_counter()
            idx = shard[i : i + args.batch]
            x, y = images[idx], labels[idx]
            if args.amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0:
                synchronize()
                first_step_s = time.perf_counter() - t_step
            step += 1
            if step == args.warmup + args.steps:
                break
        epoch += 1
    synchronize()
    seconds = time.perf_counter() - t0
    config = None
    if quantizer is not None:
        model.eval()
        model.cpu()
        config = quantizer.export_model(f"/tmp/ddp_model_{rank}.pth", f"/tmp/ddp_calib_{rank}.json")
    return {
        "gpu": "cpu" if args.cpu else torch.cuda.get_device_name(device),
        "per_gpu_batch": args.batch,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "first_step_s": first_step_s,
        "seconds": seconds,
        "images_per_second": world * args.batch * args.steps / seconds,
        "torch": torch.__version__,
        "nccl": None if args.cpu else ".".join(map(str, torch.cuda.nccl.version())),
        "mixq": mixq.__version__,
        "config": config,
    }


if __name__ == "__main__":
    main()
