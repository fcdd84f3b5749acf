"""Float ops of the ``cuda`` backend, run by torch on tensors of the model's (NCHW) logical shape.

These are the layers the config leaves in float (run "as they are": fp32 with TF32 off, or fp16 where
the layer asks for 16 bits) and the glue the fused kernels do not cover (softmax, an unfolded BatchNorm,
a dequantized tensor that a float op needs)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..base import EngineError

__all__ = ["run_torch_op", "dequantize_nhwc", "HOST_CONSTANT_OPS"]

# Ops whose constant inputs (a shape, bounds, slice limits) are read on the host: they stay numpy, never copied
# to the device (a copy inside CUDA-graph capture is an error).
HOST_CONSTANT_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Clip", "Slice", "Expand"})


def _const(v, like: torch.Tensor | None = None):
    if isinstance(v, np.ndarray):
        t = torch.from_numpy(np.array(v))  # a copy: onnx constants are read-only
        if like is not None and t.is_floating_point():
            t = t.to(device=like.device, dtype=like.dtype)
        elif like is not None:
            t = t.to(device=like.device)
        return t
    return v


def _pads(pads, nd: int):
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> F.pad order (last dim first), or None if symmetric."""
    begin, end = list(pads[:nd]), list(pads[nd:])
    if begin == end:
        return None, begin
    order = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        order += [b, e]
    return order, [0] * nd


def _pool(x, a: dict, is_max: bool):
    nd = x.dim() - 2
    k = list(a["kernel_shape"])
    s = list(a.get("strides", [1] * nd))
    explicit, sym = _pads(a.get("pads", [0] * (2 * nd)), nd)
    ceil = bool(a.get("ceil_mode", 0))
    if explicit is not None:
        x = F.pad(x, explicit, value=-torch.inf if is_max else 0.0)
    fn = {(1, True): F.max_pool1d, (2, True): F.max_pool2d, (1, False): F.avg_pool1d, (2, False): F.avg_pool2d}
    if is_max:
        return fn[(nd, True)](x, k, s, sym, list(a.get("dilations", [1] * nd)), ceil_mode=ceil)
    return fn[(nd, False)](x, k, s, sym, ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))


def run_torch_op(op: str, inputs: list, a: dict) -> torch.Tensor:
    """One ONNX op on torch tensors (``inputs``: tensors, numpy constants or None), as ONNX defines it."""
    x = inputs[0] if inputs else None
    like = next((i for i in inputs if isinstance(i, torch.Tensor)), None)
    args = inputs if op in HOST_CONSTANT_OPS else [_const(i, like) for i in inputs]
    if op == "Conv":
        nd = args[1].dim() - 2
        explicit, sym = _pads(a.get("pads", [0] * (2 * nd)), nd)
        if explicit is not None:
            x = F.pad(x, explicit)
        conv = F.conv1d if nd == 1 else F.conv2d
        b = args[2] if len(args) > 2 else None
        return conv(x, args[1], b, list(a.get("strides", [1] * nd)), sym, list(a.get("dilations", [1] * nd)),
                    a.get("group", 1))  # fmt: skip
    if op == "Gemm":
        w = args[1] if a.get("transB", 0) else args[1].t()
        x = x.t() if a.get("transA", 0) else x
        out = a.get("alpha", 1.0) * (x @ w.t())
        if len(args) > 2 and args[2] is not None:
            out = out + a.get("beta", 1.0) * args[2]
        return out
    if op == "MatMul":
        return args[0] @ args[1]
    if op == "Relu":
        return F.relu(x)
    if op == "Clip":
        lo = float(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        hi = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
        return torch.clamp(x, lo, hi)
    if op in ("Add", "Sub", "Mul", "Div"):
        fn = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op]
        return fn(args[0], args[1])
    if op == "MaxPool":
        return _pool(x, a, True)
    if op == "AveragePool":
        return _pool(x, a, False)
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "Flatten":
        axis = a.get("axis", 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Reshape":
        shape = [int(d) for d in np.asarray(inputs[1]).reshape(-1)]
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if op == "BatchNormalization":
        return F.batch_norm(x, args[3], args[4], args[1], args[2], False, 0.0, a.get("epsilon", 1e-5))
    if op == "LogSoftmax":
        return F.log_softmax(x, dim=a.get("axis", -1))
    if op == "Softmax":
        return F.softmax(x, dim=a.get("axis", -1))
    if op == "Sigmoid":
        return torch.sigmoid(x)
    if op == "Tanh":
        return torch.tanh(x)
    if op == "Concat":
        return torch.cat([t for t in args if t is not None], dim=a["axis"])
    if op == "Transpose":
        return x.permute(*a["perm"]) if "perm" in a else x.permute(*reversed(range(x.dim())))
    if op == "ReduceMean":
        axes = a.get("axes", list(range(x.dim())))
        return x.mean(dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))
    if op == "Squeeze":
        axes = a.get("axes") or [int(v) for v in np.asarray(inputs[1]).reshape(-1)]
        return x.squeeze(tuple(axes))
    if op == "Unsqueeze":
        axes = a.get("axes") or [int(v) for v in np.asarray(inputs[1]).reshape(-1)]
        for ax in sorted(axes):
            x = x.unsqueeze(ax)
        return x
    if op == "Cast":
        return x.float().contiguous()
    if op == "LayerNormalization":
        axis = a.get("axis", -1) % x.dim()
        bias = args[2] if len(args) > 2 else None
        return F.layer_norm(x, x.shape[axis:], args[1], bias, a.get("epsilon", 1e-5))
    if op == "ScaledDotProductAttention":  # .patterns: softmax(q kT * scale) v, kT as the graph has it
        return F.scaled_dot_product_attention(x, args[1].transpose(-1, -2), args[2], scale=a.get("scale", 1.0))
    if op == "Erf":
        return torch.erf(x)
    if op == "Gelu":
        return F.gelu(x, approximate=a.get("approximate", "none"))
    if op in ("Pow", "Sqrt", "Neg", "Softplus"):
        return {"Pow": lambda: torch.pow(args[0], args[1]), "Sqrt": lambda: torch.sqrt(x), "Neg": lambda: -x,
                "Softplus": lambda: F.softplus(x)}[op]()  # fmt: skip
    if op == "HardSigmoid":
        return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)
    if op == "HardSwish":
        return F.hardswish(x)
    if op == "Gather":
        axis = a.get("axis", 0) % x.dim()
        index = args[1].long() % x.shape[axis]
        picked = torch.index_select(x, axis, index.reshape(-1))
        return picked.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])
    if op == "Slice":
        starts, ends = (np.asarray(inputs[i]).reshape(-1) for i in (1, 2))
        axes = np.asarray(inputs[3]).reshape(-1) if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
        steps = np.asarray(inputs[4]).reshape(-1) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.dim()
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            if step < 1:
                raise EngineError("Slice with a negative step is not supported by the cuda backend")
            end = min(int(end), x.shape[int(axis)])  # ONNX writes "to the end" as INT64_MAX
            index[int(axis) % x.dim()] = slice(int(start), end, int(step))
        return x[tuple(index)]
    if op == "Expand":
        return x.expand(torch.broadcast_shapes(x.shape, tuple(int(d) for d in np.asarray(inputs[1]).reshape(-1))))
    if op == "ExpandBatch":  # a constant [1, ...] repeated for each sample of the batch of inputs[1]
        return args[0].expand(inputs[1].shape[0], *args[0].shape[1:])
    raise EngineError(f"ONNX op {op} is not supported by the cuda backend")


def dequantize_nhwc(q: torch.Tensor, shape: tuple[int, ...], scale: float, zp: int, perm=None) -> torch.Tensor:
    """The float32 tensor of logical shape ``[N, *shape]`` that an int8 stored tensor stands for (NHWC storage:
    the result is a channels-last view; a flattened one is put back in NCHW feature order: ``perm``, a long
    tensor on the device, gives the NCHW index of each stored position)."""
    v = (q.float() - zp) * scale
    if len(shape) == 1:
        if perm is None:
            return v
        out = torch.empty_like(v)
        out[:, perm] = v
        return out
    if len(shape) == 2:  # (C, L) stored as [N, 1, L, C]
        return v.reshape(v.shape[0], shape[1], shape[0]).permute(0, 2, 1)
    return v.permute(0, 3, 1, 2)
