"""fp8 graphs in the contract's ONNX form (opset 19), built with ``onnx.helper``, and their reference math.

    input -> Q/DQ (fp8) -> Conv 3x3 (fp8 weight, per-channel DequantizeLinear axis 0, float bias) -> Relu
          -> Q/DQ (fp8) -> Flatten -> Gemm (fp8 weight, per channel) -> Q/DQ (fp8) -> output

Node names carry the exporter's scopes (``/conv/Conv``), so the layers metadata attributes them: layers
``conv``, ``relu`` and ``fc``, all asking fp8. The reference is the contract's math in torch
(:func:`mixq.primitives.fake_quantize_fp8`, float32 as the fake-quant model computes).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mixq.export import LAYERS_METADATA_KEY
from mixq.primitives import fake_quantize_fp8, quantize
from mixq.spec import FP8_E4M3, FloatType

F8 = TensorProto.FLOAT8E4M3FN
C_IN, C_OUT, HW, CLASSES = 3, 8, 6, 5
INPUT_SHAPE = (1, C_IN, HW, HW)
# Tensor names as the exporter writes them (scoped), which ORT reuses for fused kernels (NCHWc conv + ReLU)
CONV_OUT, RELU_OUT, LOGITS = "/conv/Conv_output_0", "/relu/Relu_output_0", "/fc/Gemm_output_0"
LAYERS = {
    "conv": {"op_type": "Conv2d", "precision": "fp8"},
    "relu": {"op_type": "ReLU", "precision": "fp8"},
    "fc": {"op_type": "Linear", "precision": "fp8"},
}


def fp8_initializer(name: str, values, raw: bool = True) -> onnx.TensorProto:
    """A FLOAT8E4M3FN initializer of ``values`` (on the fp8 grid): in ``raw_data`` (what ``numpy_helper`` and
    mixq's export write) or, ``raw=False``, in ``int32_data`` (``helper.make_tensor``'s default)."""
    values = np.asarray(values, np.float32)
    if raw:
        import ml_dtypes

        return numpy_helper.from_array(values.astype(ml_dtypes.float8_e4m3fn), name)
    return helper.make_tensor(name, F8, list(values.shape), values.ravel().tolist())


class Fp8Graph:
    """The model, its parameters and the reference forward."""

    def __init__(self, seed: int = 0, raw: bool = True, relu: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(C_OUT, C_IN, 3, 3, generator=g) * 0.3
        self.b1 = torch.randn(C_OUT, generator=g) * 0.1
        self.w2 = torch.randn(CLASSES, C_OUT * HW * HW, generator=g) * 0.05
        self.s_w1 = self.w1.abs().amax(dim=(1, 2, 3)) / FP8_E4M3.max
        self.s_w2 = self.w2.abs().amax(dim=1) / FP8_E4M3.max
        self.s_x, self.s_h, self.s_y = 3.0 / FP8_E4M3.max, 2.0 / FP8_E4M3.max, 1.5 / FP8_E4M3.max
        self.relu = relu
        self.model = self._build(raw)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp8-grid weights the graph stores, dequantized (float32)."""
        return fake_quantize_fp8(self.w1, self.s_w1, 0), fake_quantize_fp8(self.w2, self.s_w2, 0)

    def reference(self, x: torch.Tensor, through_fp16: bool = False) -> torch.Tensor:
        """The graph's math in float32; ``through_fp16``: each activation rounded to float16 before float8
        (double rounding, what OpenVINO's FakeConvert does)."""
        w1, w2 = self.weights()
        fq = fake_quantize_fp8_through_fp16 if through_fp16 else fake_quantize_fp8
        x = fq(x, torch.tensor(self.s_x))
        h = torch.nn.functional.conv2d(x, w1, self.b1, padding=1)
        h = h.relu() if self.relu else h
        h = fq(h, torch.tensor(self.s_h)).flatten(1)
        return fq(h @ w2.T, torch.tensor(self.s_y))

    def _build(self, raw: bool) -> onnx.ModelProto:
        zeros = torch.zeros(C_OUT)
        q1 = quantize(self.w1, self.s_w1, zeros, FloatType(), 0).float()
        q2 = quantize(self.w2, self.s_w2, zeros[:CLASSES], FloatType(), 0).float()
        inits = [
            numpy_helper.from_array(np.array(self.s_x, np.float32), "s_x"),
            numpy_helper.from_array(np.array(self.s_h, np.float32), "s_h"),
            numpy_helper.from_array(np.array(self.s_y, np.float32), "s_y"),
            fp8_initializer("zp", np.zeros(()), raw),
            fp8_initializer("w1_q", q1.numpy(), raw),
            numpy_helper.from_array(self.s_w1.numpy(), "w1_s"),
            fp8_initializer("w1_zp", np.zeros(C_OUT), raw),
            numpy_helper.from_array(self.b1.numpy(), "b1"),
            fp8_initializer("w2_q", q2.numpy(), raw),
            numpy_helper.from_array(self.s_w2.numpy(), "w2_s"),
            fp8_initializer("w2_zp", np.zeros(CLASSES), raw),
        ]

        def qdq(x: str, scale: str, scope: str) -> list:
            return [
                helper.make_node("QuantizeLinear", [x, scale, "zp"], [f"{x}_q"], name=f"/{scope}/QuantizeLinear_{x}"),
                helper.make_node("DequantizeLinear", [f"{x}_q", scale, "zp"], [f"{x}_dq"], name=f"/{scope}/DQ_{x}"),
            ]

        act = RELU_OUT if self.relu else CONV_OUT
        nodes = [
            *qdq("input", "s_x", "conv"),
            helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_zp"], ["w1"], axis=0, name="/conv/DQ_w"),
            helper.make_node("Conv", ["input_dq", "w1", "b1"], [CONV_OUT], pads=[1, 1, 1, 1], name="/conv/Conv"),
            *([helper.make_node("Relu", [CONV_OUT], [RELU_OUT], name="/relu/Relu")] if self.relu else []),
            *qdq(act, "s_h", "relu" if self.relu else "conv"),
            helper.make_node("Flatten", [f"{act}_dq"], ["flat"], name="/Flatten"),
            helper.make_node("DequantizeLinear", ["w2_q", "w2_s", "w2_zp"], ["w2"], axis=0, name="/fc/DQ_w"),
            helper.make_node("Gemm", ["flat", "w2"], [LOGITS], transB=1, name="/fc/Gemm"),
            *qdq(LOGITS, "s_y", "fc"),
            helper.make_node("Identity", [f"{LOGITS}_dq"], ["output"], name="/Identity"),
        ]
        graph = helper.make_graph(
            nodes,
            "fp8",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C_IN, HW, HW])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", CLASSES])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        layers = {k: v for k, v in LAYERS.items() if self.relu or k != "relu"}
        helper.set_model_props(model, {LAYERS_METADATA_KEY: json.dumps(layers)})
        onnx.checker.check_model(model)
        return model

    @property
    def layers(self) -> dict:
        return {k: dict(v) for k, v in LAYERS.items() if self.relu or k != "relu"}


def fake_quantize_fp8_through_fp16(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp8 fake quantization with ``x / scale`` rounded to float16 first (not mixq's math)."""
    return (x / scale).clamp(-FP8_E4M3.max, FP8_E4M3.max).half().to(torch.float8_e4m3fn).float() * scale


def fp8_steps(got: torch.Tensor, want: torch.Tensor, scale: float) -> torch.Tensor:
    """|got - want| in fp8 steps of the reference value: the e4m3 spacing at ``want / scale`` (2**(e - 3) in
    the binade [2**e, 2**(e+1)), 2**-9 for subnormals), times ``scale``."""
    v = (want / scale).abs().clamp(min=2.0**-6)
    spacing = torch.exp2(torch.floor(torch.log2(v)) - 3) * scale
    return (got - want).abs() / spacing
