"""TensorRT legality of fp8 layers on CPU: the contract's fp8 form (opset 19, float8e4m3fn Q/DQ, fp8 weights
with per-channel DequantizeLinear) is what TensorRT's strongly typed explicit quantization takes, so
``check`` accepts it and ``legalize`` keeps it (never re-quantizing fp8 to int8); what is illegal about fp8
is named; real fp8 and mixed int8/fp8 exports of zoo models are legal after legalization."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mixq
from mixq.backends.base import layer_of_node
from mixq.backends.tensorrt.check import check
from mixq.backends.tensorrt.inspect import EngineLayer, placement
from mixq.backends.tensorrt.legalize import NOTES_KEY, legalize
from mixq.export import export_qdq_onnx
from mixq.spec import FP8_E4M3
from mixq.speedup import all_fp8_config
from mixq.zoo.models import create_model

from .fp8_graphs import INPUT_SHAPE, Fp8Graph, fp8_initializer

F8 = TensorProto.FLOAT8E4M3FN
MIXED = [  # fp8 convs, int8 linears
    {"quant_types": ["input", "weight"], "quant_bits": 8, "quant_dtype": "fp8", "op_types": ["Conv2d"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def _initializers(model) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _types(model) -> dict[int, int]:
    out: dict[int, int] = {}
    for i in model.graph.initializer:
        out[i.data_type] = out.get(i.data_type, 0) + 1
    return out


def test_the_contract_fp8_graph_is_legal_and_kept_as_it_is():
    graph = Fp8Graph()
    assert [str(p) for p in check(graph.model)] == []
    legal = legalize(graph.model, graph.layers)
    assert [str(p) for p in check(legal.model)] == []
    before, after = _initializers(graph.model), _initializers(legal.model)
    for name in ("w1_q", "w2_q", "w1_s", "w2_s", "zp", "s_x", "s_h", "s_y"):
        assert after[name] == before[name]  # untouched: fp8 weights, their scales, the activations' grids
    assert TensorProto.INT8 not in _types(legal.model)
    assert [n.op_type for n in legal.model.graph.node] == [n.op_type for n in graph.model.graph.node]
    assert not any(info.get(NOTES_KEY) for info in legal.layers.values())


def _with(model, name: str, tensor: onnx.TensorProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            init.CopyFrom(tensor)
    return out


def test_illegal_fp8_is_named_by_node_and_rule():
    model = Fp8Graph().model
    bad_zp = _with(model, "w1_zp", fp8_initializer("w1_zp", np.full(8, 0.5)))
    assert [(p.node, p.rule) for p in check(bad_zp)] == [("/conv/DQ_w", "zero-point")]
    bad_scale = _with(model, "s_h", numpy_helper.from_array(np.array(0.0, np.float32), "s_h"))
    assert {(p.node, p.rule) for p in check(bad_scale)} == {
        ("/relu/QuantizeLinear_/relu/Relu_output_0", "scale"),
        ("/relu/DQ_/relu/Relu_output_0", "scale"),
    }
    old_opset = onnx.ModelProto()
    old_opset.CopyFrom(model)
    old_opset.opset_import[0].version = 13  # float8 Q/DQ needs opset 19
    problems = check(old_opset)
    assert problems and {p.rule for p in problems} == {"quantized-type"}
    assert "FLOAT8E4M3FN (opset >= 19)" in problems[0].detail


def test_per_tensor_fp8_weights_are_legal_and_kept():
    graph = Fp8Graph()
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    w = numpy_helper.to_array(_initializers(model)["w1_q"]).astype(np.float32)
    scale = float(graph.s_w1.max())  # one scale for every channel: the values re-quantized to it
    q = np.clip(w * graph.s_w1.numpy().reshape(-1, 1, 1, 1) / scale, -FP8_E4M3.max, FP8_E4M3.max)
    model = _with(model, "w1_q", fp8_initializer("w1_q", q.astype(np.float32)))
    model = _with(model, "w1_s", numpy_helper.from_array(np.array(scale, np.float32), "w1_s"))
    model = _with(model, "w1_zp", fp8_initializer("w1_zp", np.zeros(())))
    for node in model.graph.node:
        if node.name == "/conv/DQ_w":
            del node.attribute[:]
    assert [str(p) for p in check(model)] == []
    legal = legalize(model, graph.layers)
    assert _initializers(legal.model)["w1_q"] == _initializers(model)["w1_q"]


def test_fp8_weight_with_float16_scale_is_requantized_to_fp8_not_int8():
    graph = Fp8Graph()
    half = numpy_helper.from_array(graph.s_w2.numpy().astype(np.float16), "w2_s")
    model = _with(graph.model, "w2_s", half)
    legal = legalize(model, graph.layers)
    assert [str(p) for p in check(legal.model)] == []
    dq = next(n for n in legal.model.graph.node if n.name == "/fc/DQ_w")
    inits = _initializers(legal.model)
    assert inits[dq.input[0]].data_type == F8 and inits[dq.input[2]].data_type == F8
    assert TensorProto.INT8 not in _types(legal.model)
    assert "weights re-quantized to symmetric fp8 per output channel" in legal.layers["fc"][NOTES_KEY]


def _float_input_fp8_conv():
    """The graph with the conv's input Q/DQ removed: an fp8 layer whose data input is float."""
    graph = Fp8Graph()
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    keep = [n for n in model.graph.node if n.name not in ("/conv/QuantizeLinear_input", "/conv/DQ_input")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    for node in model.graph.node:
        node.input[:] = ["input" if i == "input_dq" else i for i in node.input]
    return graph, model


def test_fp8_conv_with_a_float_input_gets_an_fp8_input_from_calibration_data():
    graph, model = _float_input_fp8_conv()
    assert [(p.node, p.rule) for p in check(model)] == [("/conv/Conv", "weighted-inputs")]
    x = np.random.default_rng(0).standard_normal((8, *INPUT_SHAPE[1:])).astype(np.float32)
    legal = legalize(model, graph.layers, calibration_data=(x,))
    assert [str(p) for p in check(legal.model)] == []
    conv = next(n for n in legal.model.graph.node if n.name == "/conv/Conv")
    producer = {o: n for n in legal.model.graph.node for o in n.output}
    dq = producer[conv.input[0]]
    assert dq.op_type == "DequantizeLinear"
    inits = _initializers(legal.model)
    assert inits[dq.input[2]].data_type == F8
    scale = float(numpy_helper.to_array(inits[dq.input[1]]))
    assert scale == pytest.approx(np.abs(x).max() / FP8_E4M3.max, rel=1e-6)
    assert "input quantized from calibration_data so that TensorRT runs it fp8" in legal.layers["conv"][NOTES_KEY]


def test_fp8_conv_with_a_float_input_and_no_data_runs_float_with_a_note():
    graph, model = _float_input_fp8_conv()
    legal = legalize(model, graph.layers)
    assert [str(p) for p in check(legal.model)] == []
    conv = next(n for n in legal.model.graph.node if n.name == "/conv/Conv")
    w = numpy_helper.to_array(_initializers(legal.model)[conv.input[1]])
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, graph.weights()[0].numpy())  # the fp8 grid values, dequantized exactly
    assert any("no fp8 weight-only" in n for n in legal.layers["conv"][NOTES_KEY])


def _export(name, shape, config):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(16, *shape)
    mixq.prepare_(model, config, mixq.PTQ())
    mixq.calibrate_(model, lambda m: m(x))
    return export_qdq_onnx(mixq.deploy_model(model), (2, *shape), mixq.export_calibration(model)), x


@pytest.mark.parametrize(("name", "shape"), [("lenet", (1, 28, 28)), ("tiny_resnet", (3, 32, 32))])
@pytest.mark.parametrize("key", ["fp8", "mixed"])
def test_fp8_exports_of_zoo_models_are_legal_and_keep_fp8(name, shape, key):
    qdq, x = _export(name, shape, all_fp8_config(create_model(name)) if key == "fp8" else MIXED)
    legal = legalize(qdq.model, qdq.layers, calibration_data=(x.numpy(),))
    assert [str(p) for p in check(legal.model)] == []
    inits = _initializers(legal.model)
    producer = {o: n for n in legal.model.graph.node for o in n.output}
    for node in legal.model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        layer = layer_of_node(node.name, qdq.layers)
        weight = producer.get(node.input[1])
        want = {"fp8": F8, "int8": TensorProto.INT8}[qdq.layers[layer]["precision"]]
        assert weight is not None and weight.op_type == "DequantizeLinear", node.name
        assert inits[weight.input[0]].data_type == want, node.name


def test_inspector_fp8_kernels_are_reported_as_fp8():
    layers = {"conv": {"op_type": "Conv2d", "precision": "fp8"}}
    kernel = EngineLayer(
        name="conv kernel",
        layer_type="CaskConvolution",
        onnx_nodes=("/conv/Conv",),
        input_dtypes=("fp8",),
        output_dtypes=("fp8",),
    )
    rows = placement([kernel], {"/conv/Conv": "Conv"}, layers)
    assert rows[0].runs_as == "fp8" and rows[0].requested == "fp8"


def test_contract_graph_passes_onnx_checker_after_legalization():
    legal = legalize(Fp8Graph().model, Fp8Graph().layers)
    onnx.checker.check_model(legal.model)
    assert (
        helper.get_attribute_value(
            next(a for n in legal.model.graph.node if n.name == "/conv/DQ_w" for a in n.attribute)
        )
        == 0
    )


def test_fp8_build_on_a_gpu_without_e4m3_tensor_cores_fails_before_tensorrt(monkeypatch):
    """TensorRT's build checks the GPU first (base.check_fp8_support, as the cuda backend does): one line
    naming an fp8 layer and the capability, before TensorRT is imported (faked capability; no GPU here)."""
    from types import SimpleNamespace

    import mixq.backends.tensorrt.engine as trt_backend
    from mixq.backends import BuildOptions, EngineError

    def no_tensorrt():
        raise AssertionError("TensorRT was called before the fp8 capability check")

    monkeypatch.setattr(trt_backend, "_trt", no_tensorrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    graph = Fp8Graph()
    qdq = SimpleNamespace(model=graph.model, layers=graph.layers)
    with pytest.raises(EngineError, match=r"layer 'conv' runs fp8 \(e4m3\).*capability 8.9.*this one is 8.6"):
        trt_backend.TensorRTBackend().build(qdq, INPUT_SHAPE, BuildOptions())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(AssertionError, match="TensorRT was called"):  # Hopper: the check passes, TensorRT next
        trt_backend.TensorRTBackend().build(qdq, INPUT_SHAPE, BuildOptions())
