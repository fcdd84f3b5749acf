import copy
import math

import pytest
import torch
from torch import nn

import mixq
from mixq import LSQ, PTQ, QAT, ConfigError, ModelStructureError, fake_quantize
from mixq.nni import DoReFaQuantizer, LsqQuantizer, ObserverQuantizer, QAT_Quantizer
from mixq.primitives import choose_qparams, choose_qparams_from_tensor
from mixq.zoo.models import TorchModel, create_model
from mixq.zoo.tutorial import TUTORIAL_CONFIG_LIST

ALL8 = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


@torch.no_grad()
def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def train_steps(model, n=5, shape=(16, 1, 28, 28), lr=0.01):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(shape)).sum().backward()
        opt.step()


def test_qat_wraps_only_configured_modules_and_keeps_others():
    model = TorchModel()
    QAT_Quantizer(model, TUTORIAL_CONFIG_LIST, None, torch.rand(32, 1, 28, 28)).compress()
    wrapped = set(mixq.quantized_layers(model))
    assert wrapped == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3", "relu4"}
    assert isinstance(model.fc3, nn.Linear) and isinstance(model.pool1, nn.MaxPool2d)
    with pytest.raises(ModelStructureError, match="already prepared"):
        QAT_Quantizer(model, TUTORIAL_CONFIG_LIST)


def test_qat_forward_equals_explicit_fake_quant_math():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 4))
    ref = copy.deepcopy(model)
    mixq.prepare_(model, [{"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_names": ["0"]}], QAT())
    x = torch.randn(32, 8)
    model.train()
    y = model(x)
    w = ref[0].weight
    sx, zx = choose_qparams(x.min(), x.max(), mixq.QuantSpec(mixq.IntType(8, False), False))
    xq = fake_quantize(x, sx, zx, mixq.IntType(8, False))
    spec_w = mixq.QuantSpec(mixq.IntType(8, True), True, mixq.PerChannel(0))
    sw, zw = choose_qparams_from_tensor(w, spec_w)
    wq = fake_quantize(w, sw, zw, spec_w.dtype, 0)
    out = torch.nn.functional.linear(xq, wq, ref[0].bias)
    so, zo = choose_qparams(out.min(), out.max(), mixq.QuantSpec(mixq.IntType(8, False), False))
    assert torch.allclose(y, fake_quantize(out, so, zo, mixq.IntType(8, False)), atol=1e-6)


def test_ema_ranges_update_in_training_only():
    model = TorchModel()
    QAT_Quantizer(model, TUTORIAL_CONFIG_LIST)
    train_steps(model, 3)
    rng = model.relu1.output_quantizer.observer.max_val.clone()
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28) * 100)
    assert torch.equal(model.relu1.output_quantizer.observer.max_val, rng)


def test_quant_start_step_counts_training_forwards():
    model = nn.Sequential(nn.Linear(8, 8))
    mixq.prepare_(model, [{"quant_types": ["weight"], "quant_bits": 2, "op_names": ["0"], "quant_start_step": 3}])
    x = torch.randn(4, 8)
    float_out = torch.nn.functional.linear(x, model[0].module.weight, model[0].module.bias)
    model.train()
    for _ in range(3):
        assert torch.equal(model(x), float_out)  # steps 0, 1, 2: not yet
    assert not torch.equal(model(x), float_out)  # 3 completed steps: quantized
    model.eval()
    assert not torch.equal(model(x), float_out)


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_conv1d"])
def test_bn_folding_is_exact_in_eval_and_deploy_model_matches(name):
    model = create_model(name)
    shape = (4, 3, 32, 32) if name == "tiny_resnet" else (4, 3, 20)
    train_steps(model, 3, shape)  # non-trivial running stats
    model.eval()
    x = torch.randn(shape)
    ref = model(x)
    conv_type = "Conv2d" if name == "tiny_resnet" else "Conv1d"
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": [conv_type], "quant_start_step": 10**9}]
    mixq.prepare_(model, config, QAT(), example_input=x)
    folded = {n: w.bn_name for n, w in mixq.quantized_layers(model).items()}
    assert all(folded.values()), folded
    model.eval()
    assert torch.allclose(model(x), ref, atol=1e-5)  # quantization not started: folding alone is exact
    deploy = mixq.deploy_model(model)
    assert not mixq.quantized_layers(deploy)
    assert set(deploy.state_dict()) == set(create_model(name).state_dict())  # original architecture
    assert torch.allclose(deploy(x), ref, atol=1e-5)
    fresh = create_model(name).eval()
    fresh.load_state_dict(deploy.state_dict())
    assert torch.allclose(fresh(x), ref, atol=1e-5)


def test_bn_folding_training_uses_batch_stats_and_quantized_folded_weight():
    model = create_model("tiny_resnet")
    mixq.prepare_(model, ALL8, QAT(), example_input=torch.randn(2, 3, 32, 32))
    before = model.layer1[0].conv1.bn.running_mean.clone()
    train_steps(model, 2, (8, 3, 32, 32))
    assert not torch.equal(model.layer1[0].conv1.bn.running_mean, before)
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    y = model(x)
    # The deployed float model differs from the fake-quant one by quantization noise only.
    assert sqnr_db(y, mixq.deploy_model(model)(x)) > 15


def test_folding_without_dummy_input_keeps_bn_separate():
    model = create_model("tiny_resnet")
    mixq.prepare_(model, ALL8, QAT())
    assert all(w.bn is None for w in mixq.quantized_layers(model).values())
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_untraceable_model_with_dummy_input_names_the_fix():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:
                return self.bn(self.conv(x))
            return self.conv(x)

    with pytest.raises(ModelStructureError, match="dummy_input=None"):
        QAT_Quantizer(
            Branchy(),
            [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}],
            None,
            torch.randn(1, 1, 8, 8),
        )


def test_ptq_observer_quantizer_calibrates_then_quantizes():
    torch.manual_seed(0)
    model = TorchModel().eval()
    ref = copy.deepcopy(model)
    config = [{**ALL8[0], "observer": "percentile"}, {**ALL8[1], "observer": "entropy"}]
    quantizer = ObserverQuantizer(model, config)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-6)  # calibrating: float
        quantized = quantizer.compress()
        y = quantized(x)
    assert not torch.allclose(y, ref(x))
    assert sqnr_db(ref(x), y) > 20


def test_ptq_freeze_without_calibration_names_the_layer():
    model = TorchModel()
    mixq.prepare_(model, ALL8, PTQ())
    with pytest.raises(ModelStructureError, match="'conv1': its input was never observed"):
        mixq.freeze_(model)
    # NNI's ObserverQuantizer.compress() allows it (issue 10): weights quantized, activations float, a warning
    with pytest.warns(UserWarning, match=r"never observed \(no data .*'conv1' \(input\)"):
        ObserverQuantizer(TorchModel(), ALL8).compress()


def test_calibrate_runs_user_forward_loop():
    model = TorchModel()
    mixq.prepare_(model, ALL8, PTQ())
    batches = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    mixq.calibrate_(model, lambda m: [m(b) for b in batches])
    assert model.training  # mode restored
    obs = model.relu1.output_quantizer.observer
    assert float(obs.max_val) > 0


def test_lsq_learns_scales_through_users_optimizer():
    model = TorchModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    LsqQuantizer(model, ALL8, opt)
    scales = opt.param_groups[-1]["params"]
    assert len(scales) == 5 * 2 + 4  # input + weight for 5 weighted layers, output for 4 ReLUs
    assert opt.param_groups[-1]["weight_decay"] == 0.0
    model.train()
    model(torch.randn(8, 1, 28, 28))  # first batch initialises activation scales
    before = [s.detach().clone() for s in scales]
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.nll_loss(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, scales, strict=True))
    calib = mixq.export_calibration(model)
    assert calib["fc1"]["input_scale"] == pytest.approx(float(model.fc1.input_quantizer.scale.detach().abs()))
    assert len(calib["conv1"]["weight_scale"]) == 6


def test_dorefa_weights_lie_on_the_dorefa_grid():
    model = TorchModel()
    DoReFaQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 3, "op_types": ["Linear"]}])
    w = model.fc1.weight_quantizer(model.fc1.module.weight)
    levels = 7
    grid = (w + 1) * levels / 2
    assert torch.allclose(grid, grid.round(), atol=1e-5)
    assert len(torch.unique(grid.round())) <= 8
    with pytest.raises(ConfigError, match="weights only"):
        DoReFaQuantizer(TorchModel(), [{"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]}])


def test_export_calibration_has_nni_keys_and_exact_qparams():
    model = TorchModel()
    QAT_Quantizer(model, TUTORIAL_CONFIG_LIST)
    train_steps(model, 3)
    calib = mixq.export_calibration(model)
    assert set(calib) == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3", "relu4"}
    assert {
        "weight_bits",
        "weight_scale",
        "weight_zero_point",
        "input_bits",
        "tracked_min_input",
        "tracked_max_input",
    } <= set(calib["conv1"])
    assert {"output_bits", "tracked_min_output", "tracked_max_output"} <= set(calib["relu1"])
    e = calib["fc1"]
    spec = mixq.QuantSpec.from_dict(e["input_qspec"])
    s, z = choose_qparams(e["tracked_min_input"], e["tracked_max_input"], spec)
    assert float(s) == e["input_scale"] and int(z) == e["input_zero_point"]
    ws, wz = choose_qparams_from_tensor(model.fc1.module.weight, mixq.QuantSpec.from_dict(e["weight_qspec"]))
    assert ws.tolist() == e["weight_scale"] and wz.tolist() == e["weight_zero_point"]
    assert math.isclose(calib["relu1"]["tracked_min_output"], 0.0, abs_tol=0)


@pytest.mark.parametrize("method", [QAT(), LSQ()])
def test_interrupted_qat_resumes_from_a_checkpoint_exactly(method, tmp_path):
    config = [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"], "quant_start_step": 1},
    ]
    batches = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def fresh():
        torch.manual_seed(0)
        model = create_model("tiny_resnet")
        mixq.prepare_(model, config, method, example_input=batches[0][:2])
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def steps(model, opt, data):
        model.train()
        for x in data:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    straight, opt = fresh()
    steps(straight, opt, batches)

    interrupted, opt = fresh()
    steps(interrupted, opt, batches[:2])
    torch.save({"model": interrupted.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pth")

    resumed, opt = fresh()
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    steps(resumed, opt, batches[2:])

    assert mixq.export_calibration(resumed) == mixq.export_calibration(straight)
    straight.eval()
    resumed.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(resumed(x), straight(x))


def test_config_list_given_as_a_dict_says_to_wrap_it():
    entry = {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]}
    msg = (
        "config_list must be a list of dicts (NNI's config_list), got a dict with keys "
        "['quant_types', 'quant_bits', 'op_types']; wrap it in a list: [{...}]"
    )
    with pytest.raises(ConfigError) as e:
        mixq.prepare_(TorchModel(), entry)
    assert str(e.value) == msg
    model = TorchModel()
    with pytest.raises(ConfigError) as e:
        QAT_Quantizer(model, entry, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(e.value) == msg


def test_calibration_config_given_as_config_list_says_where_it_goes(tmp_path):
    model = TorchModel()
    QAT_Quantizer(model, ALL8, None)
    model.train()
    model(torch.randn(4, 1, 28, 28))
    calib = mixq.export_calibration(model)
    msg = (
        "config_list: this is a calibration config (as export_model returns), not a config_list; pass it to "
        "ModelSpeedup(config=...) / mixq build --calibration"
    )
    with pytest.raises(ConfigError) as e:
        QAT_Quantizer(TorchModel(), calib)
    assert str(e.value) == msg
    mixq.save_calibration_config(calib, tmp_path / "c.pth")
    with pytest.raises(ConfigError) as e:  # the raw file contents, format key included
        mixq.prepare_(TorchModel(), torch.load(tmp_path / "c.pth", weights_only=True))
    assert str(e.value) == msg


def test_resolved_specs_for_another_model_name_the_missing_layers():
    specs = mixq.resolve_config(create_model("tiny_resnet"), ALL8)
    with pytest.raises(ConfigError) as e:
        mixq.prepare_(TorchModel(), specs)
    assert str(e.value) == (
        "the layer specs name 'relu', 'layer1.0.conv1', 'layer1.0.relu1', 'layer1.0.conv2' and 7 more, "
        "which TorchModel lacks"
    )


class _ShapeChecked(nn.Module):
    """Control flow on the input's shape, as torchvision's ViT has (``torch._assert``): torch.fx cannot trace it."""

    def __init__(self, norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("expected 8x8 images")
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def test_example_input_on_an_untraceable_model_without_batchnorm_needs_no_trace():
    model = _ShapeChecked(norm=False).eval()
    x = torch.randn(2, 3, 8, 8)
    specs = mixq.prepare_(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}], PTQ(), x)
    assert list(specs) == ["fc"]


def test_example_input_on_an_untraceable_model_with_batchnorm_is_one_error_naming_the_way_out():
    model = _ShapeChecked(norm=True).eval()
    with pytest.raises(ModelStructureError, match=r"cannot trace _ShapeChecked.*example_input=None"):
        mixq.prepare_(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}], PTQ(),
                      torch.randn(2, 3, 8, 8))  # fmt: skip
