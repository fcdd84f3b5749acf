"""The cuda backend (Triton kernels): :mod:`.engine` (runners, engine, backend), :mod:`.lower` (the Q/DQ graph
lowered to fused ops), :mod:`.kernels` (the Triton kernels), :mod:`.compile` (ahead-of-time compiling in worker
processes) and :mod:`.torch_ops` (ops run in torch). Importing it imports no triton."""

from .engine import CudaBackend

__all__ = ["CudaBackend"]
