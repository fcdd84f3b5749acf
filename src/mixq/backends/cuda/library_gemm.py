"""fp8 GEMM-shaped layers through cuBLASLt (``torch._scaled_mm``): a tuning candidate beside the Triton kernel.

A layer qualifies when it is one GEMM over rows of its NHWC (or token) storage: a Linear, or a 1x1 conv with
stride 1 and no padding, both fp8 (e4m3 input and weight), K and N multiples of 16 (cuBLASLt's fp8 rule), a
float input (quantized to e4m3 in a pass of its own) and a float output, with a bias and an optional float
residual (the transformer's projections and MLP layers; no clamp, output quantization, fused fake-quant or
shortcut GEMM: those stay with the Triton kernel). ``torch._scaled_mm`` runs it with row-wise scales (the
activation scale per row, each output channel's weight scale per column) and the bias in its own epilogue,
accumulating in fp32 (cuBLASLt's default for fp8: partial sums are promoted to fp32, not kept in the tensor
cores' reduced precision); the residual is added in torch. Its output is bf16 (the row-wise kernel writes no
other type: an 8-bit mantissa, coarser than the fp16 glue's 11 bits; the bias is rounded to bf16 too), so it is
a candidate only in builds that already round the float glue to 16 bits (``float_glue="fp16"``); there the
engine times it against the Triton configs per layer and keeps the faster (``CudaEngine._tune``;
``MIXQ_CUDA_LIBRARY_GEMM=0`` leaves it out)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .runners import _logical_float, _Runner, _storage_shape, quantize_to_storage

__all__ = ["LibraryGemm", "ScaledMMRunner", "library_gemm_fits"]


@dataclass(frozen=True)
class LibraryGemm:
    """The kernel choice "a library GEMM" (stored in engine files next to Triton's tile configs)."""

    name: str = "torch._scaled_mm"

    def to_dict(self) -> dict:
        return {"library": self.name}

    def __str__(self) -> str:
        return self.name


def library_gemm_fits(op) -> bool:
    """Whether ``op`` (a lowered :class:`.lower.QConv`) can run as one ``torch._scaled_mm``."""
    g = op.geometry
    one_by_one = g["kh"] == g["kw"] == 1 and g["sh"] == g["sw"] == 1 and g["ph"] == g["pw"] == 0
    return (
        op.mode == "fp8"
        and one_by_one
        and g["cin"] % 16 == 0
        and g["cout"] % 16 == 0
        and op.x_float  # quantized as it is read (the layer's own fp8 quantize pass here)
        and op.out_grid is None  # a float output: a quantized one would round bf16 values a second time
        and op.act is None
        and op.sc is None
        and op.q0 is None
        and (op.res is None or op.res[1] is None)
        and hasattr(torch, "_scaled_mm")
    )


class ScaledMMRunner(_Runner):
    def __init__(self, op, plan, device: torch.device, config: LibraryGemm):
        self.op, self.plan, self.device, self.config = op, plan, device, config
        g = op.geometry
        self.k, self.n = g["cin"], g["cout"]
        w = torch.from_numpy(np.ascontiguousarray(op.weight.reshape(self.n, self.k), np.float32))
        self.w_t = w.to(torch.float8_e4m3fn).to(device).t()  # [K, N] column-major, as cuBLASLt wants it
        self.scale_b = torch.as_tensor(op.w_scale, dtype=torch.float32).reshape(1, self.n).to(device)
        self.bias = torch.as_tensor(op.bias, dtype=torch.float32).to(torch.bfloat16).to(device)
        self.scale_a: dict[int, torch.Tensor] = {}  # rows -> [rows, 1] of the input scale (made before capture)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """A float tensor of logical shape [N, C, ...] as [rows, C] in the storage's (NHWC/token) row order."""
        return t.movedim(1, -1).reshape(-1, t.shape[1])

    def _input(self, env: dict) -> torch.Tensor:
        x = env[self.op.x]
        shape = (x.shape[0], *_storage_shape(self.plan.tensors[self.op.x].shape))
        q = torch.empty(shape, device=x.device, dtype=torch.float8_e4m3fn)
        return quantize_to_storage(x, q, self.op.grid).reshape(-1, self.k)

    def __call__(self, env: dict) -> None:
        op = self.op
        a = self._input(env)
        rows = a.shape[0]
        if rows not in self.scale_a:
            self.scale_a[rows] = torch.full((rows, 1), op.grid.scale, dtype=torch.float32, device=a.device)
        y = torch._scaled_mm(a, self.w_t, scale_a=self.scale_a[rows], scale_b=self.scale_b, bias=self.bias,
                             out_dtype=torch.bfloat16)  # fmt: skip
        if op.res is not None:
            y = y.float() + self._rows(env[op.res[0]]).float()
        g = op.geometry
        out = y.to(torch.float16 if op.out_dtype == "fp16" else torch.float32)
        out = out.reshape(env[op.x].shape[0], g["oh"], g["ow"], self.n)
        env[op.out] = _logical_float(out, self.plan.tensors[op.out].shape)

    def describe(self) -> str:
        op = self.op
        extra = "+residual(float) " if op.res is not None else ""
        return (
            "cuBLASLt fp8 GEMM (torch._scaled_mm, row-wise scales, fp32 accumulation, bf16 out) "
            f"[quantize pass + 1x1 {extra}->{op.out_dtype}]"
        )
