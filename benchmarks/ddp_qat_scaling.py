"""QAT throughput of CIFAR-10 ResNet-18 under DistributedDataParallel, 1 vs N GPUs (NCCL).

    torchrun --nproc_per_node 1 benchmarks/ddp_qat_scaling.py --out r1.json
    torchrun --nproc_per_node 2 benchmarks/ddp_qat_scaling.py --out r2.json

Per-GPU batch is fixed (weak scaling). Images/s = world * batch * timed steps / seconds, timed after warm-up
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
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import mixq
from mixq.nni import QAT_Quantizer
from mixq.zoo.data import load_cifar10
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
    p.add_argument("--train-batches", type=int, nargs="+", default=[1])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    data = load_cifar10(True, None, None, tuple(args.train_batches))
    torch.manual_seed(0)
    model = create_model("resnet18_cifar").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    quantizer = QAT_Quantizer(model, CONFIG, opt, torch.randn(2, 3, 32, 32, device=device))
    ddp = DDP(model, device_ids=[local])
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True, pin_memory=True)
    step, t0, epoch = 0, None, 0
    ddp.train()
    while step < args.warmup + args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if step == args.warmup:
                torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
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
