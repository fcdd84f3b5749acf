"""QAT in fp8 on the CPU: a few steps on real MNIST, through mixq's verbs and NNI's QAT_Quantizer, then the
calibration file and the Q/DQ export of what was trained."""

import math

import pytest
import torch
import torch.nn.functional as F

import mixq
from mixq.calibration import load_calibration_config, save_calibration_config
from mixq.export import export_qdq_onnx
from mixq.nni import QAT_Quantizer
from mixq.primitives import FP8_TORCH_DTYPE
from mixq.quantization import fake_quant
from mixq.speedup import all_fp8_config
from mixq.zoo.data import load_mnist
from mixq.zoo.fp8_parity import batches_of, compare, logits_fp8_config
from mixq.zoo.models import create_model

CONTRACT_CONFIG = [  # the contract's own example
    {"quant_types": ["input", "weight"], "quant_bits": 8, "quant_dtype": "fp8", "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "quant_dtype": "fp8", "op_types": ["ReLU"]},
]


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_mnist(True, data_dir, limit=1280), load_mnist(False, data_dir, limit=500)


def _train(model, optimizer, data, steps: int) -> list[float]:
    losses = []
    x, y = data.tensors
    model.train()
    for i in range(steps):
        optimizer.zero_grad()
        loss = F.nll_loss(model(x[i * 64 : (i + 1) * 64]), y[i * 64 : (i + 1) * 64])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _on_fp8_grid(values: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether every value is ``float32(g * scale)`` for an e4m3 value ``g``: the product the fake quantizer
    computes. ``values / scale`` is not compared with the grid itself: ``(g * scale) / scale`` is two roundings and
    lands one float32 ulp off ``g`` for some ``g`` and scales (``192 -> 191.99998``), so such a check passed or failed
    with the scale that training happened to reach, which the CPU's kernels decide (it failed with AVX2 and on
    AVX-512/AMX Xeons). Rounding ``values / scale`` to e4m3 recovers ``g`` exactly (its e4m3 neighbours are far more
    than an ulp away), so the product is compared bit for bit."""
    grid = (values / scale).to(FP8_TORCH_DTYPE).float()
    return torch.equal(grid * scale, values)


def test_qat_fp8_trains_and_moves_ranges(mnist):
    train, _ = mnist
    torch.manual_seed(0)
    model = create_model("lenet")
    mixq.prepare_(model, all_fp8_config(model), mixq.QAT(), example_input=train.tensors[0][:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, optimizer, train, 1)
    relu = mixq.quantized_layers(model)["relu3"].output_quantizer.observer
    first = (float(relu.min_val), float(relu.max_val))
    weight_before = model.fc1.module.weight.detach().clone()
    losses = _train(model, optimizer, train, 19)
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses  # it learns
    assert (float(relu.min_val), float(relu.max_val)) != first  # the EMA range moved
    assert not torch.equal(model.fc1.module.weight, weight_before)
    # the fake-quantized tensors lie on the e4m3 grid of their scales
    model.eval()
    captured = {}
    quantizer = mixq.quantized_layers(model)["relu3"].output_quantizer
    hook = quantizer.register_forward_hook(lambda _m, args, out: captured.update(raw=args[0], out=out))
    with torch.no_grad():
        model(train.tensors[0][:64])
    hook.remove()
    scale, zp = quantizer.qparams()
    assert int(zp) == 0 and _on_fp8_grid(captured["out"], scale)
    assert not _on_fp8_grid(captured["raw"], scale)  # the check can fail: the float activations are off the grid
    assert len(torch.unique(captured["out"])) > 16  # and it is not passed by a few values or all zeros


def test_fp8_grid_check_holds_where_dividing_the_product_misses_the_grid():
    """The case that made the old check CPU-dependent, on any CPU: ``(192 * s) / s`` is not 192 in float32 for this
    scale (a scale training reached with AVX2 kernels), yet ``192 * s`` is on the grid."""
    scale = torch.tensor(0.001771415350958705)
    values = torch.tensor([192.0, 48.0, 384.0, -96.0, 0.0]) * scale
    assert not torch.equal(values / scale, (values / scale).to(FP8_TORCH_DTYPE).float())  # the old, wrong check
    assert _on_fp8_grid(values, scale)
    assert not _on_fp8_grid(values + scale * 0.25, scale)


def test_nni_qat_quantizer_takes_the_contract_config(mnist):
    train, _ = mnist
    torch.manual_seed(0)
    model = create_model("lenet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    QAT_Quantizer(model, CONTRACT_CONFIG, optimizer, torch.rand(2, 1, 28, 28))
    conv = mixq.quantized_layers(model)["conv1"].layer_spec
    assert conv.input.is_float and conv.input.scheme == "per_tensor_symmetric"
    assert conv.weight.is_float and conv.weight.scheme == "per_channel_symmetric"
    losses = _train(model, optimizer, train, 5)
    assert all(math.isfinite(v) for v in losses), losses
    calib = mixq.export_calibration(model)
    assert calib["conv1"]["weight_qspec"]["dtype"] == calib["relu1"]["output_qspec"]["dtype"] == "fp8"


def test_fp8_never_takes_the_fused_integer_kernels(monkeypatch):
    """Even where the fused Triton path would be taken (a CUDA tensor in eager mode), fp8 keeps the torch ops."""

    def no_fused():
        raise AssertionError("the fused integer kernels were asked to fake-quantize an fp8 tensor")

    monkeypatch.setattr(fake_quant, "use_fused", lambda x: True)
    monkeypatch.setattr(fake_quant, "_fused", no_fused)
    model = create_model("tiny_mlp")
    mixq.prepare_(model, all_fp8_config(model), mixq.QAT())
    model.train()
    model(torch.randn(8, 16)).sum().backward()
    assert model.fc1.module.weight.grad is not None


def test_qat_fp8_calibration_file_exports_to_a_graph_that_matches(mnist, tmp_path):
    train, test = mnist
    torch.manual_seed(0)
    model = create_model("lenet")
    mixq.prepare_(model, logits_fp8_config(model, "fc3"), mixq.QAT(), example_input=train.tensors[0][:1])
    _train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train, 20)
    model.eval()
    path = save_calibration_config(mixq.export_calibration(model), tmp_path / "fp8.json")
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 1, 28, 28), load_calibration_config(path))
    assert {info["precision"] for info in qdq.layers.values()} == {"fp8", "fp32"}
    r = compare(model, qdq, batches_of(test.tensors[0], 250))
    assert r["qdq_exact"] and r["first_flips_one_step"], r  # see mixq/zoo/fp8_parity.py
    assert r["agreement"] >= 0.995, r
