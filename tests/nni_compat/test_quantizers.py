"""NNI's quantizer API (QAT_Quantizer, ObserverQuantizer, LsqQuantizer, DoReFaQuantizer): construction,
compress(), export_model (files, returned config, the model unwrapped) and load_calibration_config, on the
LeNet and the BN/residual model, as NNI's documentation describes them."""

import copy

import pytest
import torch
from torch import nn

import mixq
from mixq.nni import DoReFaQuantizer, LsqQuantizer, ModelSpeedup, ObserverQuantizer, QAT_Quantizer
from mixq.quantization import QuantWrapper

from .cases import CONFIG_LISTS, MODELS, SHAPES, batch, loader, make, sqnr_db, train_steps


def _qat(name):
    model = make(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    quantizer = QAT_Quantizer(model, CONFIG_LISTS[name], optimizer, dummy_input=batch(name, 2))
    assert quantizer.compress() is model
    train_steps(model, name, optimizer)
    return model, quantizer


@pytest.mark.parametrize("name", MODELS)
def test_export_model_unwraps_the_model_like_nni(name, tmp_path):
    model, quantizer = _qat(name)
    reference = mixq.deploy_model(model)  # what the engine computes, in float
    x = batch(name)
    calibration = quantizer.export_model(tmp_path / "model.pth", tmp_path / "calibration.pth")
    assert not any(isinstance(m, QuantWrapper) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in make(name).modules()]
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    fresh = make(name, seed=5)
    fresh.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), reference(x))
    assert quantizer.export_model(tmp_path / "model.pth", tmp_path / "calibration.pth") == calibration  # again


@pytest.mark.parametrize("name", MODELS)
def test_exported_config_round_trips_through_torch_save_into_speedup(name, tmp_path):
    model, quantizer = _qat(name)
    calibration = quantizer.export_model(tmp_path / "model.pth", tmp_path / "calibration.pth")
    torch.save(calibration, tmp_path / "kept.pth")  # what NNI users do with the returned dict
    shape = (8, *SHAPES[name])
    x = batch(name, 8)
    opts = dict(batchsize=8, backend="onnxruntime", onnx_path=None)
    direct = ModelSpeedup(model, shape, config=calibration, **opts).compress()
    expected = direct.inference(x)[0]
    for config in (
        torch.load(tmp_path / "kept.pth"),  # torch.load of the returned dict
        torch.load(tmp_path / "calibration.pth"),  # torch.load of the file export_model wrote (format key included)
        mixq.load_calibration_config(tmp_path / "calibration.pth"),
        str(tmp_path / "calibration.pth"),
    ):
        engine = ModelSpeedup(model, shape, config=config, **opts).compress()
        assert torch.equal(engine.inference(x)[0], expected)


@pytest.mark.parametrize("name", MODELS)
def test_observer_quantizer_compress_before_data_then_export(name, tmp_path):
    """NNI's own test flow: compress() right after construction (no calibration data), then export_model."""
    model = make(name).eval()
    quantizer = ObserverQuantizer(model, CONFIG_LISTS[name])
    with pytest.warns(UserWarning, match=r"never observed \(no data has been run through the model yet\)"):
        quantizer.compress()
    with pytest.warns(UserWarning, match="never observed"):
        calibration = quantizer.export_model(
            tmp_path / "m.pth", tmp_path / "c.pth", tmp_path / "m.onnx", (1, *SHAPES[name]), torch.device("cpu")
        )
    weighted = {n for n, m in make(name).named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    configured = set(mixq.resolve_config(make(name), CONFIG_LISTS[name]))
    assert set(calibration) == weighted & configured  # weights only: no activation was ever observed
    assert all(set(e) >= {"weight_bits", "weight_scale", "weight_zero_point"} for e in calibration.values())
    assert not any(k.startswith("tracked_") for e in calibration.values() for k in e)
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("name", MODELS)
def test_observer_quantizer_calibrates_then_compress(name):
    model = make(name).eval()
    reference = copy.deepcopy(model)
    quantizer = ObserverQuantizer(model, CONFIG_LISTS[name])
    with torch.no_grad():
        for x, _ in loader(name):
            model(x)
        quantizer.compress()
        x = batch(name)
        out, ref = model(x), reference(x)
    assert not torch.equal(out, ref)
    assert sqnr_db(ref, out) > 20


@pytest.mark.parametrize("name", MODELS)
def test_load_calibration_config_chain_observer_qat_lsq(name, tmp_path):
    """NNI's load_calibration_config test flow: each quantizer starts from the config the previous one exported."""
    observer_model = make(name).eval()
    observer = ObserverQuantizer(observer_model, CONFIG_LISTS[name])
    with torch.no_grad():
        for x, _ in loader(name):
            observer_model(x)
    observer.compress()
    calibration = observer.export_model(tmp_path / "m.pth")

    qat_model = make(name).eval()
    qat = QAT_Quantizer(qat_model, CONFIG_LISTS[name], torch.optim.SGD(qat_model.parameters(), lr=0.01), batch(name, 2))
    qat.load_calibration_config(calibration)
    for layer, w in mixq.quantized_layers(qat_model).items():
        for t in ("input", "output"):
            if getattr(w, f"{t}_quantizer") is not None:
                lo, hi = getattr(w, f"{t}_quantizer").tracked_range()
                assert lo == pytest.approx(calibration[layer][f"tracked_min_{t}"], rel=1e-6, abs=1e-7)
                assert hi == pytest.approx(calibration[layer][f"tracked_max_{t}"], rel=1e-6, abs=1e-7)
    from_qat = qat.export_model(tmp_path / "m2.pth")  # no training: the loaded ranges are exported
    for layer, entry in calibration.items():
        for t in ("input", "output"):
            if f"tracked_min_{t}" in entry:
                assert from_qat[layer][f"tracked_max_{t}"] == pytest.approx(entry[f"tracked_max_{t}"], rel=1e-6)

    lsq_model = make(name).eval()
    lsq = LsqQuantizer(lsq_model, CONFIG_LISTS[name], torch.optim.SGD(lsq_model.parameters(), lr=0.01))
    lsq.load_calibration_config(from_qat)
    from_lsq = lsq.export_model(tmp_path / "m3.pth")
    for layer, entry in from_qat.items():
        for t in ("input", "output"):
            if f"tracked_max_{t}" in entry:  # LSQ's grid starts at its fixed zero point and covers the range
                assert from_lsq[layer][f"tracked_max_{t}"] == pytest.approx(entry[f"tracked_max_{t}"], rel=1e-5)


def test_load_calibration_config_checks_bits_and_warns_on_missing_layers():
    model = make("lenet")
    qat = QAT_Quantizer(model, CONFIG_LISTS["lenet"], None)
    bad = {"conv1": {"input_bits": 4, "tracked_min_input": -1.0, "tracked_max_input": 1.0}}
    with pytest.raises(mixq.ConfigError, match=r"layer 'conv1': input_bits 4 in the config, 8 in this quantizer"):
        qat.load_calibration_config(bad)
    nni_made = {"conv1": {"input_bits": 8, "tracked_min_input": torch.tensor(-1.0), "tracked_max_input": 2.0}}
    with pytest.warns(UserWarning, match="no entry for 'conv2'"):
        qat.load_calibration_config(nni_made)
    assert mixq.quantized_layers(model)["conv1"].input_quantizer.tracked_range() == (-1.0, 2.0)


@pytest.mark.parametrize("name", MODELS)
def test_relu_module_forward_never_calls_is_exported_without_it(name, tmp_path):
    """NNI's test adds ``model.relu = nn.ReLU()``, which forward never calls, and quantizes every ReLU output."""
    model = make(name)
    model.unused_relu = nn.ReLU()
    config = [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    quantizer = QAT_Quantizer(model, config, torch.optim.SGD(model.parameters(), lr=0.01), batch(name, 2))
    train_steps(model, name, quantizer.optimizer, steps=1)
    with pytest.warns(UserWarning, match=r"forward never calls them\?\): 'unused_relu' \(output\)"):
        calibration = quantizer.export_model(tmp_path / "m.pth", tmp_path / "c.pth")
    assert "unused_relu" not in calibration
    assert any(e.get("output_bits") == 8 for e in calibration.values())


def test_dorefa_and_lsq_take_nnis_arguments(tmp_path):
    model = make("lenet")
    dorefa = DoReFaQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}])
    dorefa.compress()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.5)  # created after, as in NNI's example
    train_steps(model, "lenet", optimizer, steps=2)
    calibration = dorefa.export_model(tmp_path / "d.pth")
    assert sorted(calibration) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert {e["weight_bits"] for e in calibration.values()} == {8}
    lsq_model = make("tiny_resnet")
    optimizer = torch.optim.SGD(lsq_model.parameters(), lr=0.01)
    lsq = LsqQuantizer(lsq_model, CONFIG_LISTS["tiny_resnet"], optimizer)
    lsq.compress()
    train_steps(lsq_model, "tiny_resnet", optimizer, steps=2)
    calibration = lsq.export_model(tmp_path / "m.pth", tmp_path / "c.pth")
    assert calibration["fc"]["input_bits"] == 8 and calibration["fc"]["weight_bits"] == 8
