"""torch.distributed support: observers that agree across ranks, exact merging of calibration statistics,
and rank-0-only file writes. Nothing here starts processes: use ``torchrun`` (see README)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "collective_device",
    "is_main_process",
    "all_reduce_range",
    "all_reduce_sum",
    "all_reduce_mean",
    "broadcast_",
    "barrier",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def collective_device() -> torch.device:
    """Where the process group reduces: NCCL reduces CUDA tensors only, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise global min of ``lo`` and max of ``hi`` over all ranks (identity when not distributed)."""
    if not is_distributed():
        return lo, hi
    # One collective instead of two: min(lo) = -max(-lo), and negation is exact in floating point.
    packed = torch.stack([-lo.detach(), hi.detach()]).to(collective_device(), torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return (-packed[0]).to(lo.device, lo.dtype), packed[1].to(hi.device, hi.dtype)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (float64 on the wire, so integer counts add exactly)."""
    if not is_distributed():
        return t
    g = t.detach().to(collective_device(), torch.float64).clone()
    dist.all_reduce(g, op=dist.ReduceOp.SUM)
    return g.to(t.device, t.dtype)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks (identity when not distributed)."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / dist.get_world_size()


def broadcast_(t: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``t`` in place with rank ``src``'s value (no-op when not distributed)."""
    if not is_distributed():
        return
    g = t.detach().to(collective_device()).clone()
    dist.broadcast(g, src=src)
    with torch.no_grad():
        t.copy_(g.to(t.device))


def barrier() -> None:
    if is_distributed():
        dist.barrier()
