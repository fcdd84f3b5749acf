"""QAT throughput of CIFAR-10 ResNet-18 under DistributedDataParallel, 1 vs N GPUs (NCCL).

    torchrun --nproc_per_node 1 benchmarks/ddp_qat_scaling.py --out r1.json
    torchrun --nproc_per_node 2 benchmarks/ddp_qat_scaling.py --out r2.json

Per-GPU batch is fixed (weak scaling). The data set (50k synthetic CIFAR-shaped images, the same on every
rank) lives on the GPU and each rank indexes whole batches of its shard of a per-epoch permutation there, so no
CPU DataLoader (per-sample indexing and collation) limits the rate. --amp trains under bf16 autocast with
channels_last. Images/s = world * batch * timed steps / seconds, timed after warm-up
with CUDA synchronisation. At the end every rank exports its calibration config and rank 0 checks that all
ranks' configs are identical (observer ranges are reduced across ranks every step).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import mixq
from mixq.nni import QAT_Quantizer
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
    p.add_argument("--compile", action="store_true", help="torch.compile the DDP model")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.images, 3, 32, 32, device=device, generator=gen)
    labels = torch.randint(0, 10, (args.images,), device=device, generator=gen)
    torch.manual_seed(0)
    model = create_model("resnet18_cifar").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    quantizer = QAT_Quantizer(model, CONFIG, opt, torch.randn(2, 3, 32, 32, device=device))
    if args.amp:
        model.to(memory_format=torch.channels_last)
    ddp = DDP(model, device_ids=[local])
    step_model = torch.compile(ddp) if args.compile else ddp
    step, t0, epoch = 0, None, 0
    ddp.train()
    while step < args.warmup + args.steps:
        order = torch.randperm(args.images, device=device, generator=torch.Generator(device=device).manual_seed(epoch))
        shard = order[rank::world]
        for i in range(0, len(shard) - args.batch + 1, args.batch):
            if step == args.warmup:
                torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
            idx = shard[i : i + args.batch]
            x, y = images[idx], labels[idx]
            if args.amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == args.warmup + args.steps:
                break
        epoch += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.eval()
    model.cpu()
    config = quantizer.export_model("/tmp/ddp_model.pth", "/tmp/ddp_calib.json")
    gathered = [None] * world
    dist.all_gather_object(gathered, config)
    if rank == 0:
        result = {
            "gpus": world,
            "gpu": torch.cuda.get_device_name(device),
            "per_gpu_batch": args.batch,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "bf16_channels_last": args.amp,
            "compiled": args.compile,
            "seconds": seconds,
            "images_per_second": world * args.batch * args.steps / seconds,
            "configs_identical_across_ranks": all(g == gathered[0] for g in gathered),
            "torch": torch.__version__,
            "mixq": mixq.__version__,
        }
        print(json.dumps(result), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
