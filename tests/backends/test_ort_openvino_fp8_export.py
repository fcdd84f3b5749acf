"""A real PTQ fp8 export (tiny_resnet: BatchNorm folded, residual adds, per-channel fp8 weights, fp8 logits)
through the ONNX Runtime and OpenVINO engines, against the fake-quant model on real CIFAR-10 images and on
fresh random inputs; and backend="auto" on it (OpenVINO is not exact with fp8 layers, so auto skips it)."""

import copy
import warnings

import pytest
import torch

import mixq
from mixq.backends import BuildOptions, get_backend
from mixq.export import export_qdq_onnx
from mixq.speedup import ModelSpeedup, all_fp8_config
from mixq.zoo.data import load_cifar10
from mixq.zoo.models import create_model

LOGITS = {"quant_types": ["output"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": ["fc"]}  # error in steps
BATCH = 100


@pytest.fixture(scope="module")
def case(data_dir):
    """(fake-quant model, its export, logits scale, real test images, random inputs)."""
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    train = load_cifar10(True, data_dir, limit=256).tensors[0]
    test = load_cifar10(False, data_dir, limit=500).tensors[0]
    q = copy.deepcopy(model)
    config = [*all_fp8_config(model), LOGITS]  # ModelSpeedup's fp8 PTQ coverage, and the logits
    mixq.prepare_(q, config, mixq.PTQ(), example_input=train[:1])  # BN folded
    mixq.calibrate_(q, lambda m: [m(train[i : i + 64]) for i in range(0, len(train), 64)])
    q.eval()
    calibration = mixq.export_calibration(q)
    qdq = export_qdq_onnx(mixq.deploy_model(q), (BATCH, 3, 32, 32), calibration)
    scale = float(calibration["fc"]["output_scale"])
    random = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.5
    return q, qdq, scale, test, random


def _run(engine, model, x):
    with torch.no_grad():
        return torch.cat([engine.run(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]), model(x)


def test_export_is_fp8_throughout(case):
    _, qdq, _, _, _ = case
    precisions = {name: info["precision"] for name, info in qdq.layers.items()}
    assert {p for n, p in precisions.items() if "conv" in n or n == "fc"} == {"fp8"}
    assert qdq.model.opset_import[0].version == 19


def test_onnxruntime_fp8_engine_equals_the_fake_quant_model(case):
    model, qdq, scale, test, random = case
    engine = get_backend("onnxruntime").build(qdq, (BATCH, 3, 32, 32), BuildOptions(threads=1))
    assert not engine.inexact
    for x in (test, random):
        got, want = _run(engine, model, x)
        # Every rounding is the fake-quant model's, so logits are bit-equal except where float32 summation
        # order moved a value across an fp8 rounding boundary (a value within ~1e-7 relative of one): rare
        # in this small net. A logit moved across its own boundary is one fp8 spacing off: at most 32 output
        # steps (the spacing of [256, 448] x scale). A wrong rounding or a dropped ReLU breaks both bounds.
        assert float((got == want).float().mean()) >= 0.999
        assert float((got - want).abs().max()) / scale <= 32.0
        assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.99
    rows = {r.layer: r for r in engine.placement()}
    assert rows["conv1"].runs_as == "fp32" and "emulated" in rows["conv1"].note


def test_openvino_fp8_engine_runs_and_says_it_is_not_exact(case):
    model, qdq, _, test, random = case
    with pytest.warns(UserWarning, match="not exact for its fp8 layers"):
        engine = get_backend("openvino").build(qdq, (BATCH, 3, 32, 32), BuildOptions(threads=1))
    assert "float16" in engine.inexact
    for x in (test, random):
        got, want = _run(engine, model, x)
        assert torch.isfinite(got).all()
        # One fp8 step of double rounding here and there: most predictions stay, not all logits do.
        assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.9
    assert {r.runs_as for r in engine.placement() if r.requested == "fp8"} <= {"fp32", "fused"}


def test_auto_keeps_an_exact_engine_for_fp8_layers(case):
    model, _, _, test, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ModelSpeedup(model, (BATCH, 3, 32, 32), batchsize=BATCH, backend="auto", threads=1).compress()
    assert s.engine.backend != "openvino" or not s.engine.inexact
    assert "openvino quantized: skipped, not exact" in s.selection.reason
    got, _ = s.inference(test[:BATCH])
    assert torch.isfinite(got).all()
