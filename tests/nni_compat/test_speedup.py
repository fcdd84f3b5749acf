"""NNI's speedup class as NNI's tests use it: post-training quantization from a bits-only config and
``calib_data_loader`` (a DataLoader or one tensor), ``config=None``, NNI's default files, ``inference`` on
batches larger than ``batchsize``, export/load of the engine, and ``ModelSpeedupTensorRT`` without TensorRT."""

import os

import pytest
import torch
from torch import nn

import mixq
from mixq.backends import EngineError
from mixq.nni import CalibrateType, ModelSpeedup, ModelSpeedupTensorRT

from .cases import BITS_CONFIGS, MODELS, SHAPES, batch, loader, make, sqnr_db

ORT = dict(backend="onnxruntime")


@pytest.mark.parametrize("name", MODELS)
def test_bits_config_with_data_loader_calibrates_and_writes_nnis_files(name, in_tmp):
    model = make(name).eval()
    shape = (8, *SHAPES[name])
    engine = ModelSpeedup(model, shape, config=BITS_CONFIGS[name], calib_data_loader=loader(name), batchsize=8, **ORT)
    engine.compress()
    rows = {r.layer: r for r in engine.report().rows}
    for layer, bits in BITS_CONFIGS[name].items():
        expected = {8: "int8", 16: "fp16", 32: "fp32"}[bits["weight_bits"]]
        assert rows[layer].requested == expected, layer
    x = batch(name, 8)
    with torch.no_grad():
        ref = model(x)
    assert sqnr_db(ref, engine.inference(x)[0]) > 20
    os.remove("calibration.cache")  # as NNI's test does: both files are there
    os.remove("default_model.onnx")
    assert os.listdir(in_tmp) == []


def test_calibrate_type_and_calibration_cache_reuse(in_tmp):
    model = make("lenet").eval()
    opts = dict(config=BITS_CONFIGS["lenet"], calib_data_loader=loader("lenet"), batchsize=8, **ORT)
    first = ModelSpeedup(model, (8, 1, 28, 28), calibrate_type=CalibrateType.MINMAX, **opts).compress()
    again = ModelSpeedup(model, (8, 1, 28, 28), calibrate_type=CalibrateType.MINMAX, **opts).compress()
    assert first._calibrated_model is not None and again._calibrated_model is None  # the cache was used
    x = batch("lenet", 8)
    assert torch.equal(first.inference(x)[0], again.inference(x)[0])
    entropy = ModelSpeedup(model, (8, 1, 28, 28), **opts)  # NNI's default: ENTROPY2
    assert entropy.calibrate_type == CalibrateType.ENTROPY2 == "entropy"
    with pytest.warns(UserWarning, match="another model, layer config or calibrate_type"):
        entropy.compress()


def test_tensor_as_calib_data_loader_vgg_style(in_tmp):
    """NNI's VGG test: the calibration data is one input tensor (batch 1), config names ReLUs and a pool."""
    model = make("tiny_resnet").eval()
    x = torch.randn(1, 3, 32, 32)
    config = {
        "conv1": {"weight_bits": 8, "output_bits": 8},
        "relu": {"weight_bits": 32, "output_bits": 32},
        "layer1.0.conv1": {"weight_bits": 16, "output_bits": 16},
        "avgpool": {"weight_bits": 8, "output_bits": 8},
        "layer2.0.relu2": {"weight_bits": 8, "output_bits": 8},
    }
    engine = ModelSpeedup(model, (1, 3, 32, 32), config=config, calib_data_loader=x, batchsize=1, **ORT)
    engine.compress()
    out, _ = engine.inference(x)
    assert out.shape == model(x).shape
    engine.export_quantized_model(in_tmp / "engine.bin")
    engine.load_quantized_model(in_tmp / "engine.bin")
    assert torch.equal(engine.inference(x)[0], out)


def test_config_none_all_int8_on_a_relu6_model():
    model = make("lenet").eval()
    for n in ("relu1", "relu2", "relu3", "relu4"):
        setattr(model, n, nn.ReLU6())
    engine = ModelSpeedup(
        model,
        (8, 1, 28, 28),
        extra_layer_bits=8,
        calib_data_loader=loader("lenet"),
        batchsize=8,
        onnx_path=None,
        calibration_cache=None,
        **ORT,
    ).compress()
    rows = {r.layer: r for r in engine.report().rows}
    assert rows["relu1"].requested == "int8" and rows["conv1"].requested == "int8"
    x = batch("lenet", 8)
    with torch.no_grad():
        assert sqnr_db(model(x), engine.inference(x)[0]) > 20


class _Recorder:
    """Stands in for an engine and records the batch of every run."""

    def __init__(self, engine):
        self.engine, self.batches = engine, []

    def run(self, x):
        self.batches.append(len(x))
        return self.engine.run(x)


def test_inference_splits_a_large_batch_into_batchsize_chunks(in_tmp):
    model = make("lenet").eval()
    engine = ModelSpeedup(model, (32, 1, 28, 28), config={}, batchsize=32, **ORT).compress()
    whole = engine.engine.run(batch("lenet", 1000))
    engine.engine = _Recorder(engine.engine)
    out, seconds = engine.inference(batch("lenet", 1000))  # NNI's test loader: batch 1000
    assert engine.engine.batches == [32] * 31 + [8] and seconds > 0
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    engine.engine.batches.clear()
    engine.inference(batch("lenet", 20))
    assert engine.engine.batches == [20]  # within the engine's batch: one run


def test_bits_config_errors_name_the_problem():
    model = make("lenet")
    with pytest.raises(mixq.ConfigError, match="needs calib_data_loader"):
        ModelSpeedup(model, (1, 1, 28, 28), config=BITS_CONFIGS["lenet"])
    with pytest.raises(
        mixq.ConfigError, match=r"bits config: layer 'conv3' is not in the model; did you mean 'conv2'\?"
    ):
        ModelSpeedup(model, (1, 1, 28, 28), config={"conv3": {"weight_bits": 8}}, calib_data_loader=loader("lenet"))
    with pytest.raises(mixq.ConfigError, match=r"layer 'fc1': weight_bits must be one of \(8, 16, 32\)"):
        ModelSpeedup(model, (1, 1, 28, 28), config={"fc1": {"weight_bits": 4}}, calib_data_loader=loader("lenet"))
    every_layer_float = {n: {"weight_bits": 32, "output_bits": 32} for n in ("conv1", "fc1")}
    assert ModelSpeedup(model, (1, 1, 28, 28), config=every_layer_float, onnx_path=None, **ORT).layer_config == []


def test_model_speedup_tensorrt_without_tensorrt_points_to_auto():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(EngineError, match="pass backend='auto'"):
        ModelSpeedupTensorRT(make("lenet"), (32, 1, 28, 28), config={}, batchsize=32)
