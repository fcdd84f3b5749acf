import numpy as np
import pytest
import torch
from torch import nn

import mixq
from engine_cases import ptq_tutorial_style
from mixq.export import constant_resolver, export_qdq_onnx, layer_precisions
from mixq.nni import QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.zoo.models import create_model


class Zoo(nn.Module):
    """Concat, ReLU6, AvgPool, GELU, Sigmoid, Reshape, residual Add and BatchNorm in one small model."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu6 = nn.ReLU6()
        self.b = nn.Conv2d(3, 8, 1)
        self.pool = nn.AvgPool2d(2)
        self.gelu = nn.GELU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = self.relu6(self.bn(self.a(x)))
        z = torch.sigmoid(self.b(x))
        h = self.pool(torch.cat([y, z + y], dim=1))
        h = self.gap(self.gelu(h)).reshape(x.shape[0], -1)
        return self.fc(h)


CONFIG = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
    {"quant_types": ["input", "output"], "quant_bits": 8, "op_types": ["AvgPool2d"]},
]


def test_tricky_model_exports_and_engine_matches_fake_quant_model():
    torch.manual_seed(0)
    model = Zoo()
    QAT_Quantizer(model, CONFIG, None, torch.randn(2, 3, 16, 16))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, 16, 16))
    model.eval()
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 16, 16), mixq.export_calibration(model))
    ops = {n.op_type for n in qdq.model.graph.node}
    assert {"Concat", "Sigmoid", "Add", "AveragePool"} <= ops and "BatchNormalization" not in ops
    s = ModelSpeedup(model, (4, 3, 16, 16), backend="onnxruntime").compress()
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    out, _ = s.inference(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 30
    report = s.report()
    rows = {r.layer: r for r in report.rows}
    assert rows["a"].runs_as == "int8"
    # b's output feeds a float Sigmoid: ORT has no int8 conv with a float output, and the report says so.
    assert rows["b"].runs_as == "fp32" and rows["b"] in report.mismatches
    assert rows["pool"].requested == "int8"


def test_layer_precisions_rules():
    assert layer_precisions({"a": {"input_bits": 8, "weight_bits": 7}}) == {"a": "int8"}
    assert layer_precisions({"a": {"input_bits": 16, "weight_bits": 16}}) == {"a": "fp16"}
    with pytest.raises(mixq.CalibrationFileError, match=r"layer 'a' asks for \[8, 16\] bits"):
        layer_precisions({"a": {"input_bits": 16, "weight_bits": 8}})
    with pytest.raises(mixq.ConfigError, match="extra_layer_bits must be 16 or 32"):
        layer_precisions({}, extra_layer_bits=8)


def test_plain_model_without_config_is_a_clear_error():
    with pytest.raises(mixq.ConfigError, match="needs its calibration config"):
        export_qdq_onnx(nn.Sequential(nn.Linear(2, 2)), (1, 2), None)
    with pytest.raises(mixq.ConfigError, match="extra_layer_bits=8 without a config quantizes every layer"):
        ModelSpeedup(nn.Sequential(nn.Linear(2, 2)), (1, 2), extra_layer_bits=8, backend="onnxruntime").compress()


def test_op_type_mismatch_between_config_and_model_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    calib = {"0": {"op_type": "Conv2d", "weight_bits": 8, "weight_scale": 0.1, "weight_zero_point": 0}}
    with pytest.raises(mixq.CalibrationFileError, match="layer '0' is a Linear in the model but a Conv2d"):
        export_qdq_onnx(model, (1, 4), calib)


def test_export_failure_is_wrapped_with_the_shape():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(mixq.MixqError, match=r"ONNX export of Sequential with input shape \(1, 5\) failed"):
        export_qdq_onnx(model, (1, 5), {})


BN_CONFIG = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def _tiny_resnet(dummy_input):
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    QAT_Quantizer(model, BN_CONFIG, None, dummy_input)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    return model.eval()


def test_conv_feeding_an_unfolded_batchnorm_is_named_as_the_cause():
    model = _tiny_resnet(None)  # no dummy_input: the quantizer leaves the BatchNorms after their convs
    s = ModelSpeedup(model, (4, 3, 32, 32), backend="onnxruntime").compress()
    assert s.qdq.layers["conv1"] == {"op_type": "Conv2d", "precision": "int8"}  # the export folded bn1
    assert [r.runs_as for r in s.report().rows if r.layer == "conv1"] == ["int8"]
    # A conv whose output is quantized before its BatchNorm cannot be folded exactly: the note says so.
    config = [{"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_names": ["conv1"]}]
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    QAT_Quantizer(model, config)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    s = ModelSpeedup(model.eval(), (4, 3, 32, 32), backend="onnxruntime").compress()
    assert s.qdq.layers["conv1"]["unfolded_bn"] == "bn1"
    (row,) = [r for r in s.report().rows if r.layer == "conv1"]
    assert row.runs_as == "int8"  # DQ -> Conv -> Q runs as QLinearConv; the BatchNorm after it stays float
    # Where such a conv does run float, the note names the BatchNorm rather than blaming the backend.
    from mixq.backends.onnxruntime.engine import _note

    assert _note({"precision": "int8", "unfolded_bn": "bn1"}, "fp32") == (
        "BatchNorm 'bn1' after this conv could not be folded (the conv's output is quantized before it, or also "
        "used elsewhere), so the conv output feeds a float BatchNorm"
    )


def test_folded_batchnorms_leave_no_unfolded_mark():
    s = ModelSpeedup(_tiny_resnet(torch.randn(2, 3, 32, 32)), (4, 3, 32, 32), backend="onnxruntime").compress()
    assert not any("unfolded_bn" in info for info in s.qdq.layers.values())
    assert {r.layer: r.runs_as for r in s.report().rows}["conv1"] == "int8"


def test_calibration_of_another_model_names_every_mismatch_up_front():
    calib = mixq.export_calibration(_tiny_resnet(torch.randn(2, 3, 32, 32)))
    assert calib["conv1"]["folded_bn"] == "bn1"
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 16, 3))
    model.add_module("bn1", nn.ReLU())
    with pytest.raises(mixq.CalibrationFileError) as e:
        export_qdq_onnx(model, (1, 3, 32, 32), calib)
    assert str(e.value) == (
        "the calibration config does not match Sequential: layers 'relu', 'layer1.0.conv1', 'layer1.0.relu1', "
        "'layer1.0.conv2' and 6 more are not in the model; layer 'conv1' has folded_bn 'bn1', which is a ReLU, not "
        "a BatchNorm; it was made for a model with layers ['conv1', 'relu', 'layer1.0.conv1', 'layer1.0.relu1', "
        "'layer1.0.conv2', 'layer1.0.relu2', ...]"
    )
    del model.bn1
    with pytest.raises(mixq.CalibrationFileError, match="has folded_bn 'bn1', which the model lacks;"):
        export_qdq_onnx(model, (1, 3, 32, 32), {"conv1": calib["conv1"]})


@pytest.mark.parametrize("bits", [2, 3])
def test_dorefa_weights_are_stored_exactly(bits):
    """DoReFa's k-bit levels {2i/(2^k-1) - 1} are odd multiples of 1/(2^k-1): the export stores them on a
    (k+1)-bit grid with that scale, so the engine's weights are exactly the trained levels (a k-bit
    re-quantization would merge some of them)."""
    from mixq.nni import DoReFaQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    DoReFaQuantizer(model, [{"quant_types": ["weight"], "quant_bits": bits, "op_types": ["Linear"]}])
    calib = mixq.export_calibration(model)
    assert calib["0"]["weight_bits"] == bits + 1
    assert calib["0"]["weight_scale"] == pytest.approx(1 / (2**bits - 1))
    deploy = mixq.deploy_model(model)
    trained_levels = torch.unique(deploy[0].weight.detach())
    assert len(trained_levels) == 2**bits  # every level in use
    qdq = export_qdq_onnx(deploy, (1, 16), calib)
    inits = {i.name for i in qdq.model.graph.initializer}
    const = constant_resolver(qdq.model, required=True)
    dq = next(n for n in qdq.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    q, scale = const(dq.input[0]).astype(np.int32), const(dq.input[1])
    assert sorted(set(np.unique(q).tolist())) == list(range(-(2**bits - 1), 2**bits, 2))
    np.testing.assert_allclose(np.unique(q * scale), trained_levels.numpy(), rtol=0, atol=1e-6)
    x = torch.randn(64, 16)
    engine = ModelSpeedup(model, (64, 16), batchsize=64, backend="onnxruntime").compress()
    with torch.no_grad():
        np.testing.assert_allclose(engine.inference(x)[0].numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def _resnet_with_bn_statistics(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("resnet18_cifar").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, some negative gammas
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("dummy_input", [True, False])
def test_batchnorm_is_folded_at_export_with_or_without_dummy_input(dummy_input):
    """Without dummy_input the quantizer leaves BatchNorms alone; the export folds them anyway (integer
    weights unchanged, per-channel scales times |gamma / std|), so the engine computes what the fake-quant
    model computes and the graph has no BatchNormalization left."""
    model = _resnet_with_bn_statistics()
    x = torch.randn(32, 3, 32, 32)
    ptq_tutorial_style(model, x, dummy_input)
    calib = mixq.export_calibration(model)
    assert any("folded_bn" in e for e in calib.values()) == dummy_input
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 32, 32), calib)
    assert not [n for n in qdq.model.graph.node if n.op_type == "BatchNormalization"]
    assert "folded_bn" not in calib["conv1"] or dummy_input  # the caller's config is not changed
    engine = ModelSpeedup(model, (32, 3, 32, 32), batchsize=32, backend="onnxruntime").compress()
    fresh = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        for inputs in (x, fresh):
            ref, out = model(inputs), engine.inference(inputs)[0]
            sqnr = float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))
            assert sqnr > 35, sqnr
            assert float((ref.argmax(1) == out.argmax(1)).float().mean()) >= 0.95


def test_batchnorm_fold_is_skipped_when_the_conv_output_is_also_used_elsewhere():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output feeds the BatchNorm and the add

    torch.manual_seed(0)
    model = TwoUsers().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(8, 3, 8, 8)
    mixq.prepare_(model, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]}], mixq.PTQ())
    mixq.calibrate_(model, lambda m: m(x))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 8, 8), mixq.export_calibration(model))
    assert [n for n in qdq.model.graph.node if n.op_type == "BatchNormalization"]
    engine = ModelSpeedup(model, (8, 3, 8, 8), batchsize=8, backend="onnxruntime").compress()
    with torch.no_grad():
        torch.testing.assert_close(engine.inference(x)[0], model(x), rtol=1e-4, atol=1e-4)


def test_bias_that_overflows_int32_steps_stays_float_and_exact():
    """A pruned output channel (all-zero weights) gets a tiny weight scale; its bias in int32 steps of
    input scale x weight scale would overflow and clip (10.0 became 6.58). The export keeps that Gemm's
    bias float instead, and the report says why the layer may run float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight[1].zero_()
        model[2].bias[1] = 10.0
    mixq.prepare_(model, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], mixq.PTQ())
    x = torch.randn(64, 8)
    mixq.calibrate_(model, lambda m: m(x))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 8), mixq.export_calibration(model))
    assert qdq.layers["2"].get("float_bias") is True and "float_bias" not in qdq.layers["0"]
    engine = ModelSpeedup(model, (64, 8), batchsize=64, backend="onnxruntime").compress()
    out = engine.inference(x)[0]
    torch.testing.assert_close(out[:, 1], torch.full((64,), 10.0))
    with torch.no_grad():
        assert float(10 * torch.log10(model(x).pow(2).mean() / (model(x) - out).pow(2).mean())) > 35
    (row,) = [r for r in engine.report().rows if r.layer == "2"]
    assert row.runs_as == "fp32" and row.note.startswith("asked int8, runs float: its bias does not fit int32")


def test_eight_bit_dorefa_is_re_quantized_on_its_spec_and_builds():
    from mixq.nni import DoReFaQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    DoReFaQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}])
    calib = mixq.export_calibration(model)
    assert calib["0"]["weight_bits"] == 8  # nine bits would be exact, but engines hold 8-bit weights
    engine = ModelSpeedup(model, (32, 16), batchsize=32, backend="onnxruntime").compress()
    x = torch.randn(32, 16)
    with torch.no_grad():
        ref = model(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - engine.inference(x)[0]).pow(2).mean())) > 35
