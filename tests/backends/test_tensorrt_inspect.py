"""The TensorRT inspector/profiler parsing, on inspector JSON samples in TensorRT 10 and 11 form
(``tests/data/tensorrt``, written to the documented schema: see its README) for the legalized LeNet."""

import json
from pathlib import Path

import pytest
import torch

import mixq
from engine_cases import ALL8_WITH_LOGITS
from mixq.backends.tensorrt.inspect import io_tensors, layer_times, parse_engine_information, placement, tensor_dtype
from mixq.backends.tensorrt.legalize import legalize
from mixq.export import export_qdq_onnx
from mixq.zoo.models import create_model

DATA = Path(__file__).resolve().parents[1] / "data" / "tensorrt"
FC3_FP16 = [*ALL8_WITH_LOGITS[:2], {"quant_types": ["input", "weight"], "quant_bits": 16, "op_names": ["fc3"]}]


def _legal_lenet(config):
    torch.manual_seed(0)
    model = create_model("lenet").eval()
    mixq.prepare_(model, config, mixq.PTQ())
    mixq.calibrate_(model, lambda m: m(torch.randn(16, 1, 28, 28)))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (2, 1, 28, 28), mixq.export_calibration(model))
    legal = legalize(qdq.model, qdq.layers)
    return {n.name: n.op_type for n in legal.model.graph.node}, legal.layers


def _sample(name):
    return (DATA / name).read_text()


@pytest.mark.parametrize(
    ("tensor", "dtype"),
    [
        ({"Format/Datatype": "Row major linear FP32"}, "fp32"),
        ({"Format/Datatype": "Row major linear FP16 format"}, "fp16"),
        ({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}, "fp16"),
        ({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}, "int8"),
        ({"Format/Datatype": "Row major linear BF16 format"}, "bf16"),
        ({"Format/Datatype": "Row major linear FP8 format"}, "fp8"),
        ({"Format": "Row major linear format", "DataType": "Half"}, "fp16"),
        ({"Format": "Row major linear format", "DataType": "Float"}, "fp32"),
        ({"Format": "Channel major format", "Datatype": "Int8"}, "int8"),
        ({"Name": "x"}, None),
    ],
)
def test_tensor_types_of_tensorrt_10_and_11(tensor, dtype):
    assert tensor_dtype(tensor) == dtype


def test_trt10_sample_layers_types_and_onnx_nodes():
    layers = parse_engine_information(_sample("inspector_lenet_int8_trt10.json"))
    assert len(layers) == 11
    conv1 = layers[1]
    assert conv1.layer_type == "CaskConvolution" and conv1.computes_in == "int8"
    assert conv1.onnx_nodes == (
        "/conv1/input_qdq/DequantizeLinear",
        "/conv1/DequantizeLinear",
        "/conv1/Conv",
        "/relu1/module/Relu",
        "/relu1/output_qdq/QuantizeLinear",
    )
    assert layers[0].input_dtypes == ("fp32",) and layers[0].output_dtypes == ("int8",)
    assert layers[5].layer_type == "Reformat" and layers[5].onnx_nodes == ()  # a layout copy: glue


def test_trt10_sample_placement_every_weighted_layer_int8():
    ops, layers = _legal_lenet(ALL8_WITH_LOGITS)
    rows = {
        r.layer: r for r in placement(parse_engine_information(_sample("inspector_lenet_int8_trt10.json")), ops, layers)
    }
    assert {n for n, r in rows.items() if r.runs_as == "int8"} == {
        "conv1",
        "conv2",
        "fc1",
        "fc2",
        "fc3",
        "pool1",
        "pool2",
    }
    assert {n for n, r in rows.items() if r.runs_as == "fused"} == {"relu1", "relu2", "relu3", "relu4"}
    assert rows["conv1"].kernels == ("CaskConvolution",) and rows["fc1"].kernels == ("CaskGemmConvolution",)
    # standalone Q/DQ kernels: the input quantize (conv1), the relu3 -> fc2 requantize, fc3's output dequantize
    assert {n: r.unfused_qdq for n, r in rows.items() if r.unfused_qdq} == {"conv1": 1, "relu3": 1, "fc2": 1, "fc3": 1}
    assert not any(r.mismatch for r in rows.values())
    assert "bias kept float" in rows["fc1"].note


def test_trt11_sample_placement_shows_the_fp16_layer():
    ops, layers = _legal_lenet(FC3_FP16)
    rows = {
        r.layer: r
        for r in placement(parse_engine_information(_sample("inspector_lenet_mixed_fp16_trt11.json")), ops, layers)
    }
    assert rows["fc3"].requested == "fp16" and rows["fc3"].runs_as == "fp16"
    assert rows["fc3"].kernels == ("CaskGemmMatrixMultiply",)
    assert all(rows[n].runs_as == "int8" for n in ("conv1", "conv2", "fc1", "fc2"))


def test_placement_without_the_graph_reads_op_types_from_node_names():
    ops, layers = _legal_lenet(ALL8_WITH_LOGITS)
    engine_layers = parse_engine_information(_sample("inspector_lenet_int8_trt10.json"))
    assert placement(engine_layers, {}, layers) == placement(engine_layers, ops, layers)


def test_io_tensors_of_both_versions():
    assert io_tensors(_sample("inspector_lenet_int8_trt10.json")) == [
        {"name": "input", "mode": None, "dtype": None},
        {"name": "output", "mode": None, "dtype": None},
    ]
    assert io_tensors(_sample("inspector_lenet_mixed_fp16_trt11.json")) == [
        {"name": "input", "mode": "Input", "dtype": "fp32"},
        {"name": "output", "mode": "Output", "dtype": "fp32"},
    ]


def test_layer_names_only_verbosity_is_read_without_types():
    info = json.dumps(
        {"Layers": ["/conv1/Conv + /relu1/module/Relu", "/pool1/MaxPool"], "Bindings": ["input", "output"]}
    )
    layers = parse_engine_information(info)
    assert [layer.onnx_nodes for layer in layers] == [("/conv1/Conv", "/relu1/module/Relu"), ("/pool1/MaxPool",)]
    assert all(layer.computes_in is None for layer in layers)


def test_profiler_times_median_per_layer_and_glue():
    """Per-run IProfiler reports (ms per engine layer): each mixq layer gets the median of its kernels' sums,
    standalone Q/DQ and reformat kernels and names the inspector does not know go to (glue)."""
    ops, layers = _legal_lenet(ALL8_WITH_LOGITS)
    engine_layers = parse_engine_information(_sample("inspector_lenet_int8_trt10.json"))
    conv1 = engine_layers[1].name
    runs = [
        {conv1: 0.010, "/pool1/MaxPool": 0.002, "/conv1/input_qdq/QuantizeLinear": 0.001, "unknown": 0.004},
        {conv1: 0.030, "/pool1/MaxPool": 0.002, "/conv1/input_qdq/QuantizeLinear": 0.001, "unknown": 0.004},
        {conv1: 0.012, "/pool1/MaxPool": 0.004, "/conv1/input_qdq/QuantizeLinear": 0.003, "unknown": 0.004},
    ]
    times = {t.layer: t for t in layer_times(runs, engine_layers, ops, layers)}
    assert times["conv1"].microseconds == pytest.approx(12.0)
    assert times["pool1"].microseconds == pytest.approx(2.0)
    assert times["(glue)"].microseconds == pytest.approx(5.0)  # medians of 1+4, 1+4, 3+4
    assert times["conv1"].kernels == ("CaskConvolution",)
    assert [t.layer for t in layer_times(runs, engine_layers, ops, layers)] == ["conv1", "(glue)", "pool1"]
