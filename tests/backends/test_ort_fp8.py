"""ONNX Runtime with fp8 (float8e4m3fn Q/DQ, opset 19) layers: emulated in fp32 and equal to the fake-quant
math; the two ORT rewrites that are wrong for fp8 stay off; fp8 weights stored as float32 exactly."""

import numpy as np
import onnx
import pytest
import torch

from mixq.backends import BuildOptions
from mixq.backends.base import fold_fp8_weights
from mixq.backends.onnxruntime.engine import OnnxRuntimeEngine
from mixq.backends.onnxruntime.legalize import FP8_UNSAFE_REWRITES, float_output_convs, has_fp8

from .fp8_graphs import CONV_OUT, INPUT_SHAPE, Fp8Graph, fp8_initializer, fp8_steps

pytest.importorskip("onnxruntime")


def _engine(graph: Fp8Graph, **options) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(
        graph.model.SerializeToString(), INPUT_SHAPE, graph.layers, BuildOptions(threads=1, **options)
    )


def _inputs():
    g = torch.Generator().manual_seed(1)
    # randn covers the fine steps near 0; *3 reaches past the input range (3.0): saturation at +-448 steps
    return [torch.randn(64, *INPUT_SHAPE[1:], generator=g), 3 * torch.randn(64, *INPUT_SHAPE[1:], generator=g)]


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "int32_data"])
@pytest.mark.parametrize("keep_pools_float", [True, False])
def test_fp8_engine_equals_the_fake_quant_math(raw, keep_pools_float):
    graph = Fp8Graph(raw=raw)
    engine = _engine(graph, keep_pools_float=keep_pools_float)
    for x in _inputs():
        want, got = graph.reference(x), engine.run(x)
        # Every rounding is the reference's; only float32 summation order differs, which can move a value
        # across an fp8 rounding boundary: at most one fp8 step of the logits, on few values.
        steps = fp8_steps(got, want, graph.s_y)
        assert float(steps.max()) <= 1.0
        assert float((got == want).float().mean()) >= 0.99
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.98


def test_relu_before_an_fp8_quantize_is_kept():
    """ORT's ReluQuantRewrite would drop it (fp8 has no clipping zero point): negative conv outputs must
    come out as 0, not as their fp8 values."""
    graph, plain = Fp8Graph(), Fp8Graph(relu=False)
    x = _inputs()[0]
    assert not torch.equal(graph.reference(x), plain.reference(x))  # the ReLU matters on these inputs
    assert fp8_steps(_engine(graph).run(x), graph.reference(x), graph.s_y).max() <= 1.0
    assert fp8_steps(_engine(plain).run(x), plain.reference(x), plain.s_y).max() <= 1.0


def test_default_ort_rewrites_break_fp8_and_the_engine_turns_them_off():
    """The reason for FP8_UNSAFE_REWRITES, on this ORT: with every rewrite on, the folded fp8 graph is wrong."""
    import onnxruntime as ort

    graph = Fp8Graph()
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    fold_fp8_weights(model)
    x = _inputs()[0]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    plain = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wrong = torch.from_numpy(plain.run(None, {"input": x.numpy()})[0])
    assert fp8_steps(wrong, graph.reference(x), graph.s_y).max() > 1.0
    engine = _engine(graph)
    assert engine.fp8
    assert set(FP8_UNSAFE_REWRITES) <= set(engine._session_kwargs()["disabled_optimizers"])


def test_int8_graphs_keep_every_rewrite():
    from .test_cpu_exactness import _lenet_qdq

    qdq = _lenet_qdq(batch=8)
    assert not has_fp8(qdq.model)
    engine = OnnxRuntimeEngine(qdq.model.SerializeToString(), (8, 1, 28, 28), qdq.layers, BuildOptions(threads=1))
    assert not engine.fp8
    assert not set(FP8_UNSAFE_REWRITES) & set(engine._session_kwargs().get("disabled_optimizers", []))


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "int32_data"])
def test_fold_fp8_weights_is_the_dequantize_linear_bit_for_bit(raw):
    import onnxruntime as ort

    graph = Fp8Graph(raw=raw)
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    probe = onnx.ModelProto()
    probe.CopyFrom(graph.model)
    for name in ("w1", "w2"):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    w1, w2 = sess.run(["w1", "w2"], {"input": np.zeros(INPUT_SHAPE, np.float32)})
    assert fold_fp8_weights(model) == ["/conv/DQ_w", "/fc/DQ_w"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.array_equal(inits["w1"].view(np.uint32), w1.view(np.uint32))
    assert np.array_equal(inits["w2"].view(np.uint32), w2.view(np.uint32))
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in ("w1_q", "w2_q") for n in model.graph.node)
    assert "w1_q" not in inits and "w1_zp" not in inits  # what only the folded nodes read is gone
    onnx.checker.check_model(model)
    assert fold_fp8_weights(model) == []  # nothing left to fold


def test_placement_says_fp8_runs_as_emulated_fp32():
    rows = {r.layer: r for r in _engine(Fp8Graph()).placement()}
    for name in ("conv", "fc"):
        assert rows[name].requested == "fp8" and rows[name].runs_as == "fp32"
        assert "asked fp8" in rows[name].note and "emulated" in rows[name].note
    assert rows["relu"].runs_as == "fused"


def test_fp8_convs_get_no_build_time_uint8_output():
    """ORT's legalization quantizes float conv outputs to uint8 for int8 convs only; an fp8 conv would just
    be rounded once more."""
    model = Fp8Graph(relu=False).model
    for node in model.graph.node:  # the conv output feeds a Relu, then its Q/DQ, and a float reader
        if node.op_type == "QuantizeLinear" and node.input[0] == CONV_OUT:
            node.input[0] = "act_out"
    after_conv = [n.name for n in model.graph.node].index("/conv/Conv") + 1
    model.graph.node.insert(after_conv, onnx.helper.make_node("Relu", [CONV_OUT], ["act_out"], name="/act/Relu"))
    side = onnx.helper.make_node("Identity", [CONV_OUT], ["side"], name="/side/Identity")  # a float reader
    model.graph.node.insert(after_conv, side)
    onnx.checker.check_model(model)
    assert float_output_convs(model) == []
    int8_like = onnx.ModelProto()  # the same graph with the weight's zero point integer: it is found
    int8_like.CopyFrom(model)
    for init in int8_like.graph.initializer:
        if init.name in ("w1_q", "w1_zp"):
            init.CopyFrom(
                onnx.numpy_helper.from_array(np.zeros(onnx.numpy_helper.to_array(init).shape, np.int8), init.name)
            )
    assert [n.name for n in float_output_convs(int8_like)] == ["/conv/Conv"]


def test_has_fp8_sees_initializers_and_constants():
    graph = Fp8Graph()
    assert has_fp8(graph.model)
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Constant", [], ["z"], value=fp8_initializer("z", np.zeros(())))],
            "c",
            [],
            [onnx.helper.make_empty_tensor_value_info("z")],
        )
    )
    assert has_fp8(model)


def test_placement_report_prints_the_fp8_notes():
    from mixq.report import PlacementReport

    text = str(PlacementReport("onnxruntime", _engine(Fp8Graph()).placement()))
    assert "note: conv: asked fp8: ORT CPU has no fp8 kernels" in text
    assert "note: fc: asked fp8" in text


def test_fp8_engine_file_round_trip(tmp_path):
    from mixq.backends import load_engine

    engine = _engine(Fp8Graph())
    loaded = load_engine(engine.save(tmp_path / "fp8.mixq"))
    x = _inputs()[0]
    assert loaded.fp8 and torch.equal(loaded.run(x), engine.run(x))


class _Relu6Net(torch.nn.Module):
    """Conv -> ReLU6 -> Conv -> ReLU -> Linear: ReLU6 exports as a Clip in front of an fp8 QuantizeLinear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu6 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6()
        self.conv2, self.relu = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
        self.fc = torch.nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.relu(self.conv2(self.relu6(self.conv1(x)))).flatten(1))


def test_relu6_fp8_model_builds_and_equals_the_fake_quant_model():
    """ORT's ClipQuantRewrite fails on a float8 zero point ("Unexpected data type for QuantizeLinear input
    y_zero_point of 17") and would drop the Clip's lower bound as ReluQuantRewrite drops a ReLU: off for fp8."""
    import mixq
    from mixq.backends import get_backend
    from mixq.export import export_qdq_onnx
    from mixq.speedup import all_fp8_config

    torch.manual_seed(0)
    model = _Relu6Net().eval()
    model.conv1.weight.data *= 8  # conv1 outputs past 6 and below 0: both Clip bounds matter
    calib = 2 * torch.randn(64, 3, 8, 8)
    logits = {"quant_types": ["output"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": ["fc"]}  # steps
    mixq.prepare_(model, [*all_fp8_config(model), logits], mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(model, lambda m: m(calib))
    calibration = mixq.export_calibration(model)
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 8, 8), calibration)
    assert {qdq.layers[n]["precision"] for n in ("conv1", "relu6", "conv2", "fc")} == {"fp8"}
    assert "Clip" in [n.op_type for n in qdq.model.graph.node]
    engine = get_backend("onnxruntime").build(qdq, (64, 3, 8, 8), BuildOptions(threads=1))
    assert "ClipQuantRewrite" in engine._session_kwargs()["disabled_optimizers"]
    scale = float(calibration["fc"]["output_scale"])
    g = torch.Generator().manual_seed(2)
    for x in (calib, 2 * torch.randn(64, 3, 8, 8, generator=g), 5 * torch.randn(64, 3, 8, 8, generator=g)):
        with torch.no_grad():
            want = model(x)
        assert bool((model.conv1(x) > 6).any() and (model.conv1(x) < 0).any())  # both Clip bounds act
        got = engine.run(x)
        # As in test_ort_openvino_fp8_export: every rounding is the fake-quant model's; float32 summation order
        # may move a value across an fp8 rounding boundary (rare), a logit then one fp8 spacing (<= 32 steps) off.
        assert float((got == want).float().mean()) >= 0.99
        assert float((got - want).abs().max()) / scale <= 32.0
        assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.98
