"""TensorRT legality on CPU: every registered model and every config the tests use passes ``check()`` after the
TensorRT legalization; the backend-neutral export and a planted illegal graph list their problems by node
and rule."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import mixq
from engine_cases import ALL8_WITH_LOGITS, TUTORIAL_STYLE
from mixq.attention import explicit_attention_
from mixq.backends.tensorrt.check import RULES, check
from mixq.backends.tensorrt.legalize import legalize
from mixq.export import export_qdq_onnx
from mixq.zoo.coverage import COVERAGE_MODELS
from mixq.zoo.models import create_model, list_models
from test_model_structures import SharedReLU

SHAPES = {
    "lenet": (1, 28, 28),
    "resnet18_cifar": (3, 32, 32),
    "tiny_resnet": (3, 32, 32),
    "tiny_mlp": (16,),
    "tiny_conv1d": (3, 20),
    **{name: shape[1:] for name, shape in COVERAGE_MODELS.items()},  # tiny_vit, tiny_bert, convnext_block, ...
}
WEIGHTED = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["default"]}]
CONFIGS = {
    "tutorial": TUTORIAL_STYLE,
    "all_int8": [  # ModelSpeedup's PTQ config: every conv/linear input and weight, every ReLU output
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["default"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ],
    "weighted_only": WEIGHTED,
    "weight_only": [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}],
    "input_only": [{"quant_types": ["input"], "quant_bits": 8, "op_types": ["default"]}],
    "conv_outputs": [
        {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["default"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ],
    "symmetric_int8": [
        {
            "quant_types": ["input", "weight"],
            "quant_bits": 8,
            "op_types": ["default"],
            "quant_dtype": "int",
            "quant_scheme": {"input": "per_tensor_symmetric", "weight": "per_channel_symmetric"},
        }
    ],
    "affine_weights": [
        {
            "quant_types": ["input", "weight"],
            "quant_bits": 8,
            "op_types": ["default"],
            "quant_scheme": {"input": "per_tensor_affine", "weight": "per_tensor_affine"},
            "quant_dtype": {"input": "uint", "weight": "uint"},
        }
    ],
    "mixed_fp16": [*WEIGHTED[:1], {"quant_types": ["input", "weight"], "quant_bits": 16, "op_types": ["Linear"]}],
    # the attention's Q.K^T and P.V with both operands int8 (TensorRT's MatMul Q/DQ pattern)
    "attention_matmuls": [*WEIGHTED, {"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]}],
}


def _applies(config, model) -> bool:
    try:
        mixq.resolve_config(model, config)
    except mixq.ConfigError:  # e.g. names Conv2d or ReLU, which tiny_mlp / tiny_conv1d do not have
        return False
    return True


def _export(model, shape, config, calibrate_on, extra_layer_bits=32, dummy_input=False):
    mixq.prepare_(model, config, mixq.PTQ(), example_input=calibrate_on[:1] if dummy_input else None)
    mixq.calibrate_(model, lambda m: m(calibrate_on))
    return export_qdq_onnx(mixq.deploy_model(model), (2, *shape), mixq.export_calibration(model), extra_layer_bits)


def _explicit(name):
    return explicit_attention_(create_model(name)).modules()


def _cases():
    for name in list_models():
        for key, config in CONFIGS.items():
            if not _applies(config, create_model(name)):
                continue
            if key == "attention_matmuls" and not any(type(m).__name__ == "MatMul" for m in _explicit(name)):
                continue
            if name == "resnet18_cifar" and key != "tutorial":
                continue  # tiny_resnet has the same blocks; resnet18's export alone takes ~10 s
            yield pytest.param(name, key, id=f"{name}-{key}")


@pytest.mark.parametrize(("name", "key"), list(_cases()))
def test_every_model_and_config_is_legal_after_legalization(name, key):
    torch.manual_seed(0)
    shape = SHAPES[name]
    x = torch.randn(16, *shape)
    qdq = _export(create_model(name).eval(), shape, CONFIGS[key], x)
    legal = legalize(qdq.model, qdq.layers, calibration_data=(x.numpy(),))
    assert [str(p) for p in check(legal.model)] == []


@pytest.mark.parametrize("extra_layer_bits", [16, 32])
def test_lenet_logits_config_and_extra_fp16_are_legal(extra_layer_bits):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    qdq = _export(create_model("lenet").eval(), (1, 28, 28), ALL8_WITH_LOGITS, x, extra_layer_bits)
    legal = legalize(qdq.model, qdq.layers, calibration_data=(x.numpy(),))
    assert [str(p) for p in check(legal.model)] == []
    if extra_layer_bits == 16:  # the pools, unconfigured, run fp16: cast in the graph
        assert any(n.op_type == "Cast" and n.name.startswith("/pool1/") for n in legal.model.graph.node)


class ConcatPools(nn.Module):
    """Shapes users bring beyond the zoo: a concat of two conv branches, average and max pools, an
    unfolded BatchNorm (its conv output is quantized first) and a residual add over a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.avg = nn.AvgPool2d(2)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_c = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        h = self.avg(self.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))
        h = self.relu(h + self.bn_c(self.c(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


STRUCTURE_CONFIGS = {
    "tutorial": TUTORIAL_STYLE,
    "pools": [*TUTORIAL_STYLE, {"quant_types": ["output"], "quant_bits": 8, "op_types": ["AvgPool2d", "MaxPool2d"]}],
    "conv_outputs": CONFIGS["conv_outputs"],
}


@pytest.mark.parametrize("key", list(STRUCTURE_CONFIGS))
def test_concat_pools_batchnorm_residual_are_legal(key):
    torch.manual_seed(0)
    model = ConcatPools()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16))
    x = torch.randn(16, 3, 16, 16)
    qdq = _export(model.eval(), (3, 16, 16), STRUCTURE_CONFIGS[key], x)
    legal = legalize(qdq.model, qdq.layers, calibration_data=(x.numpy(),))
    assert [str(p) for p in check(legal.model)] == []


def test_shared_module_inplace_and_functional_relu_are_legal():
    torch.manual_seed(0)
    config = [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_names": ["act"]},
    ]
    x = torch.randn(16, 8)
    qdq = _export(SharedReLU().eval(), (8,), config, x)
    legal = legalize(qdq.model, qdq.layers, calibration_data=(x.numpy(),))
    assert [str(p) for p in check(legal.model)] == []


def test_tutorial_export_lists_what_tensorrt_rejects():
    """The backend-neutral export (the issue's finding): uint8 activations, a non-zero zero point on the
    input, int32 bias DequantizeLinear nodes on fc1..fc3."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    qdq = _export(create_model("lenet").eval(), (1, 28, 28), TUTORIAL_STYLE, x)
    problems = check(qdq.model)
    rules = {(p.node, p.rule) for p in problems}
    assert ("/conv1/input_qdq/QuantizeLinear", "zero-point") in rules
    assert {f"/fc{i}/BiasDequantizeLinear" for i in (1, 2, 3)} == {n for n, r in rules if r == "float-bias"}
    quantize = [n.name for n in qdq.model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == 9 and all((n, "quantized-type") in rules for n in quantize)  # 5 inputs, 4 ReLUs
    assert all(p.kind == "rejected" for p in problems)


def test_residual_conv_output_without_data_is_named_and_noted():
    """Without calibration data the shortcut conv's output has no range: it stays float, ``check`` names the
    add, and the layer's note says what to pass."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    qdq = _export(create_model("tiny_resnet").eval(), (3, 32, 32), TUTORIAL_STYLE, x)
    legal = legalize(qdq.model, qdq.layers)
    assert [(p.node, p.rule) for p in check(legal.model)] == [("/layer2/layer2.0/Add", "residual-input")]
    assert "calib_data_loader" in " ".join(legal.layers["layer2.0.shortcut.0"]["tensorrt"])


def _planted() -> onnx.ModelProto:
    """A graph breaking one rule per node: uint8 input with zero point 3, a per-channel activation scale,
    conv weights on the wrong axis with a negative scale, an int32 bias DQ, a residual add of two quantized
    convs, a gemm with a dequantized weight and a float input, a DQ of a graph input, a Q/DQ between a softmax
    and the graph output, and an fp16 layer reading float32."""
    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.array(0.02, f32), "s"),
        numpy_helper.from_array(np.array(3, np.uint8), "zp_u8"),
        numpy_helper.from_array(np.full(4, 0.1, f32), "s_vec"),
        numpy_helper.from_array(np.zeros(4, np.int8), "zp_vec"),
        numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int8), "w"),
        numpy_helper.from_array(np.array([0.1, -0.1, 0.1, 0.1], f32), "w_scale"),
        numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int8), "w2"),
        numpy_helper.from_array(np.full(4, 0.1, f32), "w2_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "zp4"),
        numpy_helper.from_array(np.ones(4, np.int32), "b_q"),
        numpy_helper.from_array(np.array(0.001, f32), "b_s"),
        numpy_helper.from_array(np.array(0, np.int32), "b_zp"),
        numpy_helper.from_array(np.ones((4, 4), np.int8), "g_w"),
        numpy_helper.from_array(np.array(0.1, f32), "g_s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp0"),
        numpy_helper.from_array(np.ones((4, 4), f32), "h_w"),
        numpy_helper.from_array(np.array([1, 16], np.int64), "flat"),
    ]
    n = helper.make_node
    nodes = [
        n("QuantizeLinear", ["x", "s", "zp_u8"], ["xq"], name="/in/QuantizeLinear"),
        n("DequantizeLinear", ["xq", "s", "zp_u8"], ["xd"], name="/in/DequantizeLinear"),
        n("QuantizeLinear", ["xd", "s_vec", "zp_vec"], ["xq2"], name="/act/QuantizeLinear", axis=1),
        n("DequantizeLinear", ["xq2", "s_vec", "zp_vec"], ["xd2"], name="/act/DequantizeLinear", axis=1),
        n("DequantizeLinear", ["w", "w_scale", "zp4"], ["wd"], name="/conv/DequantizeLinear", axis=1),
        n("DequantizeLinear", ["b_q", "b_s", "b_zp"], ["bd"], name="/conv/BiasDequantizeLinear"),
        n("Conv", ["xd2", "wd", "bd"], ["c1"], name="/conv/Conv"),
        n("DequantizeLinear", ["w2", "w2_scale", "zp4"], ["w2d"], name="/conv2/DequantizeLinear", axis=0),
        n("Conv", ["xd2", "w2d"], ["c2"], name="/conv2/Conv"),
        n("Add", ["c1", "c2"], ["sum"], name="/Add"),
        n("Reshape", ["sum", "flat"], ["flat_sum"], name="/Reshape"),
        n("DequantizeLinear", ["g_w", "g_s", "zp0"], ["g_wd"], name="/fc/DequantizeLinear"),
        n("Gemm", ["flat_sum", "g_wd"], ["g"], name="/fc/Gemm", transB=1),
        n("DequantizeLinear", ["raw", "g_s", "zp0"], ["rawd"], name="/raw/DequantizeLinear"),
        n("Gemm", ["rawd", "h_w"], ["h"], name="/head/Gemm", transB=1),
        n("Add", ["g", "h"], ["gh"], name="/Add_1"),
        n("Softmax", ["gh"], ["sm"], name="/soft/Softmax"),
        n("QuantizeLinear", ["sm", "g_s", "zp0"], ["smq"], name="/soft/QuantizeLinear"),
        n("DequantizeLinear", ["smq", "g_s", "zp0"], ["y"], name="/soft/DequantizeLinear"),
    ]
    graph = helper.make_graph(
        nodes,
        "planted",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2]),
            helper.make_tensor_value_info("raw", TensorProto.INT8, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    meta = model.metadata_props.add()
    layers = {"conv": "int8", "conv2": "int8", "fc": "int8", "head": "fp16"}
    meta.key = "mixq.layers"
    meta.value = json.dumps({k: {"op_type": "Linear", "precision": v} for k, v in layers.items()})
    return model


def test_planted_illegal_graph_lists_each_problem_by_node_and_rule():
    found = {(p.node, p.rule) for p in check(_planted())}
    expected = {
        ("/in/QuantizeLinear", "quantized-type"),
        ("/in/QuantizeLinear", "zero-point"),
        ("/in/DequantizeLinear", "zero-point"),
        ("/act/QuantizeLinear", "per-channel-activation"),
        ("/act/DequantizeLinear", "per-channel-activation"),
        ("/conv/DequantizeLinear", "weight-axis"),
        ("/conv/DequantizeLinear", "scale"),
        ("/conv/BiasDequantizeLinear", "float-bias"),
        ("/Add", "residual-input"),
        ("/fc/Gemm", "weighted-inputs"),
        ("/raw/DequantizeLinear", "dq-source"),
        ("/soft/QuantizeLinear", "unfusable-qdq"),
        ("/head/Gemm", "fp16-in-graph"),
    }
    assert expected <= found, expected - found
    assert {rule for _, rule in found} == set(RULES) - {"q-consumer"}
    text = [str(p) for p in check(_planted())]
    assert "/conv/DequantizeLinear: [weight-axis] axis 1, but /conv/Conv's output channels are on axis 0" in text


def test_quantized_tensor_reaching_a_float_op_is_named():
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="/q/QuantizeLinear"),
            helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT, name="/Cast"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [s, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert [(p.node, p.rule) for p in check(model)] == [("/q/QuantizeLinear", "q-consumer")]
