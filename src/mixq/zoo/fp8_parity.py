"""The exported fp8 Q/DQ graph run literally by ONNX Runtime (graph optimizations off) against the fake-quant model,
tensor by tensor. Shared by tests/test_fp8_onnx_parity.py, tests/test_fp8_qat.py and
benchmarks/fp8_export_parity.py.

What the math says, and what :func:`compare` checks:

* QuantizeLinear/DequantizeLinear with a FLOAT8E4M3FN zero point compute ``x / scale`` in float32, saturate to
  +-448 and round to nearest even, then multiply by the scale: the very operations of
  :func:`mixq.primitives.fake_quantize_fp8`. So every quantized tensor in the graph equals ``fake_quantize_fp8`` of
  its own input, bit for bit (``qdq_exact``).
* Everything between two quantizers is float32: ReLU, max pooling, flatten and the residual add are the same IEEE
  operations in both; Conv, Gemm and average pooling sum in another order, which moves a sum by at most
  ``gamma_K * sum|terms|`` (K terms, ``gamma_K ~ K * 2**-24``), a relative change of about 1e-5 for the layers here,
  far below half an e4m3 step (a relative 2**-5 to 2**-4). So where all quantized inputs of a tensor agree, its
  fp8 values agree except where the pre-quantization value lies within that distance of a rounding midpoint, and
  such a value lands on the neighbouring e4m3 value: at an image's first differing quantized tensor, every
  difference is exactly one e4m3 step (``first_flips_one_step``). Later tensors inherit the change, which the
  network amplifies or damps: that part has no bound from the math, so it is measured (flipped images, top-1
  agreement, SQNR and the largest error at the quantized logits) and not asserted beyond the project's targets.

Errors at the logits are in e4m3 steps at the larger magnitude of the two values (``ulp``: 1 for neighbours in
one binade, 0.5 across a binade boundary): a relative measure, as e4m3's steps grow with the value.
"""

from __future__ import annotations

import math

import onnx
import onnxruntime as ort
import torch

import mixq
from mixq.backends.base import layer_of_node
from mixq.export import QDQExport
from mixq.primitives import FP8_TORCH_DTYPE, fake_quantize_fp8, quantize
from mixq.spec import FP8_E4M3

# The finite e4m3 values in increasing order (one zero): a value's index is its position on the grid.
_ALL = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_TORCH_DTYPE).float()
GRID = torch.unique(_ALL[~torch.isnan(_ALL)])


def grid_index(dq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Position on the e4m3 grid of dequantized values ``dq`` (``quantize`` recovers the exact code)."""
    return torch.searchsorted(GRID, quantize(dq, scale, None, FP8_E4M3).float().contiguous())


def ulp(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 step at ``|values|`` (in the units of ``values``): 2**(e - 3) x scale for |v| / scale in
    [2**e, 2**(e+1)), e >= -6; 2**-9 x scale below (subnormals)."""
    v = (values.abs() / scale).clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(v)) - 3) * scale


def activation_quantizers(qdq: QDQExport) -> list[dict]:
    """Every activation QuantizeLinear of the export in graph order: its layer, quant type, input, output and scale."""
    proto = qdq.model
    inits = {i.name: i for i in proto.graph.initializer}
    consumers = {i: n for n in proto.graph.node for i in n.input}
    found = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = consumers[node.output[0]]
        scale = torch.from_numpy(onnx.numpy_helper.to_array(inits[node.input[1]]).copy())
        found.append(
            {
                "layer": layer_of_node(node.name, qdq.layers),
                "type": next((t for t in ("input", "input1") if f"/{t}_qdq/" in node.name), "output"),
                "q_input": node.input[0],
                "dq_output": dq.output[0],
                "scale": scale,
            }
        )
    return found


def literal_session(qdq: QDQExport, names: list[str]) -> ort.InferenceSession:
    """ONNX Runtime running the graph as written (optimizations off), with ``names`` as extra outputs."""
    proto = onnx.ModelProto()
    proto.CopyFrom(qdq.model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def compare(model: torch.nn.Module, qdq: QDQExport, batches: list[torch.Tensor]) -> dict:
    """Run ``batches`` through the fake-quant ``model`` (prepared, eval mode) and through ORT; the quantized logits
    are the last activation quantizer of the graph (the config must quantize the final layer's output in fp8)."""
    quantizers = activation_quantizers(qdq)
    session = literal_session(qdq, [n for q in quantizers for n in (q["q_input"], q["dq_output"])])
    wrappers = mixq.quantized_layers(model)
    captured: dict = {}
    hooks = []
    for q in quantizers:
        module = getattr(wrappers[q["layer"]], f"{q['type']}_quantizer")
        key = (q["layer"], q["type"])
        hooks.append(module.register_forward_hook(lambda _m, _a, out, key=key: captured.__setitem__(key, out)))
    r = {"images": 0, "agree": 0, "flipped_images": 0, "max_steps": 0.0, "qdq_exact": True}
    signal, noise = 0.0, 0.0
    r["first_flips_one_step"], r["first_flips"], r["first_flip_tensors"] = True, 0, set()
    logits = quantizers[-1]
    try:
        for x in batches:
            with torch.no_grad():
                model(x)
            outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            ort_values = dict(zip([o.name for o in session.get_outputs()], outs, strict=True))
            seen = torch.zeros(len(x), dtype=torch.bool)  # images that differed in an earlier quantized tensor
            for q in quantizers:
                q_in = torch.from_numpy(ort_values[q["q_input"]])
                dq = torch.from_numpy(ort_values[q["dq_output"]])
                r["qdq_exact"] &= torch.equal(fake_quantize_fp8(q_in, q["scale"]), dq)
                ref = captured[(q["layer"], q["type"])]
                differs = (dq != ref).reshape(len(x), -1)
                first = differs.any(1) & ~seen
                if first.any():
                    steps = (grid_index(dq, q["scale"]) - grid_index(ref, q["scale"])).abs().reshape(len(x), -1)
                    r["first_flips_one_step"] &= bool((steps[first][differs[first]] == 1).all())
                    r["first_flips"] += int(differs[first].sum())
                    r["first_flip_tensors"].add(f"{q['layer']} ({q['type']})")
                seen |= differs.any(1)
            ref = captured[(logits["layer"], logits["type"])]
            got = torch.from_numpy(ort_values[logits["dq_output"]])
            steps = (got - ref).abs() / ulp(torch.maximum(got.abs(), ref.abs()), logits["scale"])
            r["max_steps"] = max(r["max_steps"], float(steps.max()))
            signal, noise = signal + float(ref.double().pow(2).sum()), noise + float((got - ref).double().pow(2).sum())
            r["agree"] += int((got.argmax(1) == ref.argmax(1)).sum())
            r["flipped_images"] += int(seen.sum())
            r["images"] += len(x)
    finally:
        for h in hooks:
            h.remove()
    r["agreement"] = r["agree"] / r["images"]
    r["sqnr_db"] = 10 * math.log10(signal / noise) if noise > 0 else math.inf
    r["first_flip_tensors"] = sorted(r["first_flip_tensors"])
    return r


def logits_fp8_config(model: torch.nn.Module, last: str) -> list[dict]:
    """:func:`mixq.speedup.all_fp8_config` with the final layer's output (the logits) quantized too."""
    from mixq.speedup import all_fp8_config

    return [
        *all_fp8_config(model),
        {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": [last]},
    ]


def batches_of(x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [x[i : i + batch] for i in range(0, len(x), batch)]
