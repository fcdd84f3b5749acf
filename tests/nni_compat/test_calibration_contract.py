"""The calibration config contract: NNI-shaped dicts (tensor values, float zero points, per-channel tensors,
with or without mixq's extra keys, 32 bits meaning float) build the same engines as mixq's own dicts."""

import pytest
import torch

import mixq
from mixq.calibration import FORMAT_KEY, normalize_calibration_config
from mixq.nni import QAT_Quantizer
from mixq.speedup import ModelSpeedup

from .cases import CONFIG_LISTS, MODELS, SHAPES, batch, make, train_steps

MIXQ_ONLY = ("_scale", "_zero_point", "_qspec", "op_type", "folded_bn")


def _trained(name):
    model = make(name)
    QAT_Quantizer(model, CONFIG_LISTS[name], None)  # no dummy_input: no BN folding, as in many NNI scripts
    return train_steps(model, name)


def _as_nni_made(calibration: dict) -> dict:
    """What NNI's QAT export_model returns for the same layers: tensors for weight qparams (per-channel
    shaped [C, 1, 1, 1]), floats for zero points, floats for ranges, no mixq keys."""
    out = {}
    for layer, entry in calibration.items():
        e = {k: v for k, v in entry.items() if not k.endswith(MIXQ_ONLY) or k.startswith("weight_")}
        e = {k: v for k, v in e.items() if not k.endswith(("_qspec", "op_type", "folded_bn"))}
        if "weight_scale" in e:
            scale = torch.tensor(e["weight_scale"], dtype=torch.float32)
            e["weight_scale"] = scale.reshape(-1, 1, 1, 1) if scale.dim() else scale.reshape(1)
            e["weight_zero_point"] = torch.tensor(e["weight_zero_point"], dtype=torch.float32).reshape(
                e["weight_scale"].shape
            )
        for t in ("input", "output"):
            if f"tracked_min_{t}" in e:
                e[f"tracked_min_{t}"] = torch.tensor(e[f"tracked_min_{t}"])
        out[layer] = e
    return out


def test_normalize_accepts_nni_values_and_mixq_file_contents():
    nni = {
        "conv1": {
            "weight_bits": 8,
            "weight_scale": torch.tensor([[[[0.1]]], [[[0.2]]]]),
            "weight_zero_point": torch.tensor([[[[0.0]]], [[[0.0]]]]),
            "input_bits": torch.tensor(8),
            "tracked_min_input": torch.tensor([-1.0]),
            "tracked_max_input": 2.5,
        },
        "fc1": {"weight_bits": 32, "output_bits": 32, "tracked_min_output": 0.0, "tracked_max_output": 1.0},
        "fc2": {"weight_bits": 8, "weight_scale": torch.tensor([0.05]), "weight_zero_point": torch.tensor([3.0])},
    }
    plain = normalize_calibration_config({FORMAT_KEY: 1, **nni})
    assert plain == {
        "conv1": {
            "weight_bits": 8,
            "weight_scale": pytest.approx([0.1, 0.2]),
            "weight_zero_point": [0, 0],
            "input_bits": 8,
            "tracked_min_input": -1.0,
            "tracked_max_input": 2.5,
        },
        "fc2": {"weight_bits": 8, "weight_scale": pytest.approx(0.05), "weight_zero_point": 3},
    }  # fc1 at 32 bits is float: dropped
    assert isinstance(nni["conv1"]["weight_scale"], torch.Tensor)  # the caller's dict is untouched
    with pytest.raises(mixq.CalibrationFileError, match="weight_zero_point must be an int, got 0.5"):
        normalize_calibration_config({"fc2": {**nni["fc2"], "weight_zero_point": torch.tensor([0.5])}})
    with pytest.raises(mixq.CalibrationFileError, match="format version 7"):
        normalize_calibration_config({FORMAT_KEY: 7})


def test_nni_observer_quantizer_weight_entries_become_symmetric_scales():
    """NNI's ObserverQuantizer writes a weight as a symmetric range over -127..127 instead of a scale."""
    entry = {"weight_bits": 8, "tracked_max_weight": 1.27, "tracked_min_weight": -1.27}
    entry |= {"tracked_qmin_weight": -127, "tracked_qmax_weight": 127}
    plain = normalize_calibration_config({"fc1": entry})["fc1"]
    assert plain["weight_scale"] == pytest.approx(0.01) and plain["weight_zero_point"] == 0


@pytest.mark.parametrize("name", MODELS)
def test_nni_made_dict_builds_the_same_engine_as_mixqs(name):
    model = _trained(name)
    calibration = mixq.export_calibration(model)
    deploy = mixq.deploy_model(model)
    shape, x = (8, *SHAPES[name]), batch(name, 8)
    opts = dict(batchsize=8, backend="onnxruntime")
    ours = ModelSpeedup(deploy, shape, config=calibration, **opts).compress().inference(x)[0]
    nni_made = _as_nni_made(calibration)
    assert not any(k.endswith("_qspec") for e in nni_made.values() for k in e)
    theirs = ModelSpeedup(deploy, shape, config=nni_made, **opts).compress().inference(x)[0]
    # Same ranges and symmetric weight scales: read as mixq's default specs, the same engine.
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("name", MODELS)
def test_nni_default_uint_affine_weights_are_requantized_from_the_weights(name):
    """NNI's default weight quantization is per-tensor affine uint (zero points like 98), which its dict does
    not say; as NNI's TensorRT backend does, the engine quantizes the weights itself."""
    model = _trained(name)
    calibration = mixq.export_calibration(model)
    deploy = mixq.deploy_model(model)
    nni_made = _as_nni_made(calibration)
    for layer, entry in nni_made.items():
        if "weight_scale" in entry:
            w = dict(deploy.named_modules())[layer].weight.detach()
            lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            scale = (hi - lo) / 255
            entry["weight_scale"] = torch.tensor([scale])
            entry["weight_zero_point"] = torch.tensor([float(round(-lo / scale))])
    shape, x = (8, *SHAPES[name]), batch(name, 8)
    engine = ModelSpeedup(deploy, shape, config=nni_made, batchsize=8, backend="onnxruntime").compress()
    ours = ModelSpeedup(deploy, shape, config=calibration, batchsize=8, backend="onnxruntime").compress()
    assert torch.equal(engine.inference(x)[0], ours.inference(x)[0])  # same weights, same default spec
