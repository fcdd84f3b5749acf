"""The loops ``mixq quantize`` runs, usable from Python: QAT epochs (single process or DDP under torchrun,
optionally bf16 autocast and torch.compile) and PTQ calibration (sharded across ranks). They take a model that is
already prepared for quantization (``mixq.prepare_`` or an ``mixq.nni`` quantizer) and data as tensors; writing
files is the caller's job. In the Python API the user may equally own the loop (``mixq.calibrate_`` takes any
forward loop); these are the ones the command line gives.

A progress ``factory(total=, desc=)`` returns an object with ``update(n, loss=, images=)`` and ``close()``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["QATOptions", "Placement", "qat_train", "ptq_calibrate", "training_device", "init_distributed"]


@dataclass(frozen=True)
class QATOptions:
    """SGD settings and speed options of :func:`qat_train`."""

    epochs: int = 1
    batch_size: int = 128
    amp: bool = False  # bf16 autocast and channels_last (fake quantization itself computes in fp32)
    compile: bool = False  # torch.compile (CUDA graphs on a GPU); full batches only: one batch shape, one graph


@dataclass(frozen=True)
class Placement:
    """This process's rank, the world size and the training device (``init_distributed`` under torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def training_device(choice: str = "auto") -> torch.device:
    """``auto``: the current CUDA GPU if there is one, else the CPU; else ``choice`` itself."""
    if choice == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(choice)


def init_distributed() -> Placement:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and return this process's placement."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Placement(dist.get_rank(), dist.get_world_size(), device)


def qat_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable,
    options: QATOptions = QATOptions(),
    placement: Placement = Placement(),
    progress=None,
) -> nn.Module:
    """Train the prepared ``model`` for ``options.epochs`` epochs on ``(images, labels)``; returns it.

    The data set lives on the training device and whole batches are indexed there: no per-sample indexing and
    collation on the CPU, which at GPU rates is a bottleneck of its own. The epoch's order is RandomSampler's
    (randperm with the epoch as seed); under DDP each rank takes an equal strided shard of it."""
    from torch.nn.parallel import DistributedDataParallel

    device, rank, world = placement.device, placement.rank, placement.world
    memory_format = torch.channels_last if options.amp and images.dim() == 4 else torch.contiguous_format
    model.to(memory_format=memory_format)
    net = model
    if options.compile:
        # Compiled before DDP wraps it, with optimize_ddp off (docs/distributed.md); CUDA graphs on a GPU.
        torch._dynamo.config.optimize_ddp = False
        net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if options.amp else contextlib.nullcontext
    images, labels = images.to(device), labels.to(device)
    batch = options.batch_size
    for epoch in range(options.epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        if world > 1:
            order = order[: len(order) // world * world][rank::world]
        order = order.to(device)
        # Full batches only under DDP (every rank the same count) and when compiled (one batch shape, one graph).
        full_only = world > 1 or options.compile
        steps = len(order) // batch if full_only else -(-len(order) // batch)
        bar = progress(total=steps, desc=f"QAT epoch {epoch + 1}/{options.epochs}") if progress else None
        net.train()
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            optimizer.zero_grad()
            with autocast():
                loss = loss_fn(net(images[idx].contiguous(memory_format=memory_format)), labels[idx])
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.update(1, loss=loss.detach().item(), images=len(idx))
        if bar is not None:
            bar.close()
    return model


def ptq_calibrate(
    model: nn.Module, images: torch.Tensor, batch_size: int, placement: Placement = Placement(), note=None
) -> int:
    """Run this rank's equal shard of ``images`` through the prepared ``model`` in eval mode (every rank the same
    batch count, so the observers' collectives line up); returns the number of images this rank calibrated on.
    ``note(text)``, when given, is told what is calibrated."""
    from .quantization import calibrate_

    rank, world, device = placement.rank, placement.world, placement.device
    model.eval()
    per_rank = len(images) // world // batch_size * batch_size or len(images) // world
    shard = images[rank * per_rank : (rank + 1) * per_rank]
    if note is not None:
        note(f"PTQ: calibrating on {len(shard)} images in batches of {batch_size}")
    calibrate_(model, lambda m: [m(shard[i : i + batch_size].to(device)) for i in range(0, len(shard), batch_size)])
    return len(shard)
