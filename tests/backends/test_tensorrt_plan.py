"""What the TensorRT backend would feed the builder, checked without TensorRT."""

import pytest
import torch

import mixq
from mixq.backends import BuildOptions, EngineError
from mixq.backends.tensorrt import TensorRTBackend, plan_network
from mixq.export import export_qdq_onnx
from mixq.zoo.models import TorchModel


def _lenet(config, extra_layer_bits=32):
    torch.manual_seed(0)
    model = TorchModel()
    mixq.prepare_(model, config, mixq.QAT())
    model.train()
    model(torch.randn(8, 1, 28, 28))
    return export_qdq_onnx(
        mixq.deploy_model(model.eval()), (1, 1, 28, 28), mixq.export_calibration(model), extra_layer_bits
    )


INT8 = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


def test_all_int8_plan_uses_explicit_quantization_and_dynamic_batch_profile():
    plan = plan_network(_lenet(INT8), (32, 1, 28, 28), BuildOptions(max_batch=256, opt_batch=32))
    assert plan.flags == ("INT8",)
    assert plan.profile == ((1, 1, 28, 28), (32, 1, 28, 28), (256, 1, 28, 28))
    assert plan.input_name == "input"
    # Unconfigured layers (relu, pools) are pinned to fp32 only when FP16 is on; with INT8 alone they stay float.
    assert set(plan.layer_precision.values()) <= {"fp32"}


def test_fp16_layers_get_precision_constraints():
    config = [*INT8, {"quant_types": ["input", "weight"], "quant_bits": 16, "op_names": ["fc3"]}]
    qdq = _lenet(config)
    strict = plan_network(qdq, (8, 1, 28, 28), BuildOptions(max_batch=64, opt_batch=8))
    assert strict.flags == ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS")
    fc3_nodes = {n for n, p in strict.layer_precision.items() if p == "fp16"}
    assert fc3_nodes and all(n.startswith("/fc3/") for n in fc3_nodes)
    loose = plan_network(qdq, (8, 1, 28, 28), BuildOptions(max_batch=64, opt_batch=8, strict_precision=False))
    assert "PREFER_PRECISION_CONSTRAINTS" in loose.flags


def test_extra_layer_bits_16_runs_unconfigured_layers_in_fp16():
    plan = plan_network(_lenet(INT8, extra_layer_bits=16), (8, 1, 28, 28), BuildOptions(max_batch=8, opt_batch=8))
    assert "FP16" in plan.flags
    assert any(
        n.startswith("/relu1/") or n.startswith("/pool1/") for n, p in plan.layer_precision.items() if p == "fp16"
    )


def test_bad_profile_is_rejected():
    with pytest.raises(EngineError, match="opt_batch"):
        plan_network(_lenet(INT8), (8, 1, 28, 28), BuildOptions(max_batch=4, opt_batch=8))


def test_backend_reports_unavailable_without_tensorrt():
    backend = TensorRTBackend()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert not backend.is_available()
        assert "onnxruntime" in backend.unavailable_reason()
