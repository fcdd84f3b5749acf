import json
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import mixq
from engine_cases import ptq_tutorial_style
from mixq.backends import BuildOptions, EngineError, get_backend, load_engine
from mixq.backends.base import layer_of_node
from mixq.backends.onnxruntime.engine import INT8_KERNELS, cpu_has_vnni, weights_to_uint8
from mixq.export import export_qdq_onnx
from mixq.nni import ModelSpeedupTensorRT, QAT_Quantizer
from mixq.report import PlacementReport
from mixq.speedup import ModelSpeedup
from mixq.zoo.models import TorchModel, create_model
from mixq.zoo.tutorial import ALL_8BIT_CONFIG_LIST, FAST_MIXED_CONFIG_LIST, TUTORIAL_CONFIG_LIST


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    model = TorchModel()
    QAT_Quantizer(model, TUTORIAL_CONFIG_LIST, None, torch.rand(2, 1, 28, 28))
    model.train()
    for _ in range(3):
        model(torch.randn(32, 1, 28, 28))
    return model.eval()


@pytest.fixture(scope="module")
def all8():
    """The demo's all-8-bit LeNet after a few QAT steps on random data."""
    torch.manual_seed(0)
    model = TorchModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    QAT_Quantizer(model, ALL_8BIT_CONFIG_LIST, opt, torch.rand(8, 1, 28, 28))
    model.train()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.nll_loss(model(torch.randn(32, 1, 28, 28)), torch.randint(0, 10, (32,))).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def all8_speedup(all8):
    return ModelSpeedup(all8, (16, 1, 28, 28), batchsize=16, backend="onnxruntime").compress()


@pytest.fixture(scope="module")
def engine(lenet):
    return ModelSpeedup(lenet, (32, 1, 28, 28), batchsize=32, backend="onnxruntime").compress()


def test_float_model_plus_exported_config_builds_the_same_engine(lenet, engine, tmp_path):
    calib = mixq.export_calibration(lenet)
    torch.save(mixq.deploy_model(lenet).state_dict(), tmp_path / "m.pth")
    plain = TorchModel()
    plain.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    other = ModelSpeedup(plain, (32, 1, 28, 28), config=calib, batchsize=32, backend="onnxruntime").compress()
    x = torch.randn(16, 1, 28, 28)
    assert torch.equal(other.inference(x)[0], engine.inference(x)[0])


def test_dynamic_batch_and_inference_returns_seconds(engine):
    for b in (1, 7, 300):
        out, seconds = engine.inference(torch.randn(b, 1, 28, 28))
        assert out.shape == (b, 10) and out.dtype == torch.float32 and seconds > 0


def test_qdq_model_structure(lenet):
    qdq = export_qdq_onnx(mixq.deploy_model(lenet), (1, 1, 28, 28), mixq.export_calibration(lenet))
    ops = [n.op_type for n in qdq.model.graph.node]
    assert ops.count("QuantizeLinear") == 8  # 4 layer inputs + 4 ReLU outputs; weights are initializers
    weights = [i for i in qdq.model.graph.initializer if i.data_type == 3 and len(i.dims) > 1]  # int8 tensors
    assert len(weights) == 4
    assert qdq.layers["fc3"]["precision"] == "fp32" and qdq.layers["conv1"]["precision"] == "int8"


def test_placement_report_lists_every_layer(engine):
    report = engine.report()
    rows = {r.layer: r for r in report.rows}
    assert rows["conv1"].runs_as == "int8" and "QLinearConv" in rows["conv1"].kernels
    assert rows["fc1"].runs_as == "int8"
    assert rows["fc3"].requested == "fp32" and rows["fc3"].runs_as == "fp32"
    assert rows["relu1"].runs_as == "fused"
    assert report.mismatches == []
    assert "| conv1 | Conv2d | int8 | int8 | QLinearConv |" in str(report)


def test_report_shows_int8_request_running_in_float():
    torch.manual_seed(0)
    model = TorchModel().eval()
    # Weight-only int8 on fc1: ORT has no int8 kernel for a float input, so the layer runs as float.
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["fc1"]}]
    mixq.prepare_(model, config, mixq.QAT())
    report = ModelSpeedup(model, (4, 1, 28, 28), backend="onnxruntime").compress().report()
    (row,) = [r for r in report.rows if r.layer == "fc1"]
    assert row.mismatch and row.runs_as == "fp32"
    assert "WARNING: fc1 asked for int8 but runs as fp32" in str(report)


def test_report_compares_with_float_per_layer(engine):
    report = engine.report(compare_float=True, batch=8, runs=3)
    assert report.batch == 8
    assert report.times["conv1"] > 0 and report.float_times["conv1"] > 0
    assert report.groups["conv1"] == ["conv1", "relu1"]
    assert "total kernel time" in str(report)


def _check_times_belong_to_rows(report, profile):
    """Each profiled layer time is of kernels its row lists; Q/DQ only under glue; rows plus glue add up."""
    rows = {r.layer: r for r in report.rows}
    for t in profile:
        if t.layer == "(glue)":
            continue
        assert rows[t.layer].kernels and set(t.kernels) <= set(rows[t.layer].kernels), t
        assert not {"QuantizeLinear", "DequantizeLinear"} & set(t.kernels), t
    total = sum(t.microseconds for t in profile)
    assert report.total(report.times) == pytest.approx(total)
    shown = sum(report.row_times(report.times).values())
    assert shown + report.glue(report.times) == pytest.approx(total)


def test_all_int8_report_with_float_comparison(all8_speedup, monkeypatch):
    engine = all8_speedup.engine
    profiles = []

    def recording_profile(x, runs=20):
        profiles.append(type(engine).profile(engine, x, runs))
        return profiles[-1]

    monkeypatch.setattr(engine, "profile", recording_profile)
    report = all8_speedup.report(compare_float=True, batch=8, runs=2)
    rows = {r.layer: r for r in report.rows}
    text = str(report)
    assert rows["relu1"].runs_as == "fused" and rows["relu1"].kernels == ()
    assert f"| relu1 | ReLU | int8 | fused | - | {rows['relu1'].unfused_qdq} | in conv1 | in conv1 |" in text
    assert (
        f"| conv1 | Conv2d | int8 | int8 | QLinearConv | {rows['conv1'].unfused_qdq} | {report.times['conv1']:.1f} |"
        in text
    )
    _check_times_belong_to_rows(report, profiles[0])
    assert report.glue(report.times) > 0  # the Q/DQ nodes
    assert (
        f"glue: {report.glue(report.times):.1f} us, float {report.glue(report.float_times, own=False):.1f} us" in text
    )
    assert "not measured" not in text


def test_all_int8_report_times_only_as_the_cli_builds_it(all8_speedup):
    engine = all8_speedup.engine
    profile = engine.profile(torch.randn(8, 1, 28, 28), 2)
    report = PlacementReport(engine.backend, engine.placement())
    report.times = {t.layer: t.microseconds for t in profile}
    report.batch = 8
    text = str(report)
    rows = {r.layer: r for r in report.rows}
    assert f"| relu1 | ReLU | int8 | fused | - | {rows['relu1'].unfused_qdq} | fused | - |" in text
    assert "relu1" not in report.times  # its DequantizeLinear is glue
    _check_times_belong_to_rows(report, profile)
    total = sum(t.microseconds for t in profile)
    assert text.splitlines()[-2:] == [
        f"glue: {report.glue(report.times):.1f} us, float not measured",
        f"total kernel time: {total:.1f} us, float engine not measured",
    ]
    assert "WARNING" not in text
    assert not re.search(r"(?<![\d.])0\.0 us", text)  # nothing unmeasured printed as zero


def test_all_int8_report_without_times(all8_speedup):
    report = all8_speedup.report()
    text = str(report)
    assert report.times == {} and report.float_times == {}
    assert "time us" not in text and "glue" not in text and "total" not in text
    assert all(r.runs_as == "int8" for r in report.rows if r.op_type in ("Conv2d", "Linear"))
    assert all(set(r.kernels) & INT8_KERNELS for r in report.rows if r.runs_as == "int8")  # int8 means int8 kernels
    unfused = sum(r.unfused_qdq for r in report.rows)
    assert (
        text.splitlines()[-1]
        == f"unfused Q/DQ nodes: {unfused} in the layers above, {report.glue_qdq} outside any layer"
    )


def test_float_conv_fused_with_its_relu_is_the_convs_kernel():
    # ORT names a float Conv+ReLU (NCHWc) after the ReLU's output; the kernel is the conv's all the same.
    torch.manual_seed(0)
    model = TorchModel()
    QAT_Quantizer(model, FAST_MIXED_CONFIG_LIST)
    model.train()
    model(torch.randn(8, 1, 28, 28))
    model.eval()
    s = ModelSpeedup(model, (8, 1, 28, 28), batchsize=8, backend="onnxruntime").compress()
    rows = {r.layer: r for r in s.report().rows}
    assert rows["conv1"].runs_as == "fp32" and set(rows["conv1"].kernels) <= {"Conv", "FusedConv"}
    assert rows["relu1"].runs_as == "fused" and rows["relu1"].kernels == ()
    times = {t.layer: t for t in s.engine.profile(torch.randn(8, 1, 28, 28), 2)}
    assert "relu1" not in times and set(times["conv1"].kernels) <= {"Conv", "FusedConv"}


def test_engine_save_load_round_trip_is_identical(engine, tmp_path):
    path = engine.export_quantized_model(tmp_path / "lenet.mixq")
    loaded = ModelSpeedup(TorchModel(), (32, 1, 28, 28), backend="onnxruntime").load_quantized_model(path)
    x = torch.randn(32, 1, 28, 28)
    assert torch.equal(loaded.inference(x)[0], engine.inference(x)[0])
    assert [r.runs_as for r in loaded.report().rows] == [r.runs_as for r in engine.report().rows]


def _rewrite(path, out, mutate):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    mutate(members)
    with zipfile.ZipFile(out, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)


def test_corrupt_engine_files_give_clear_errors(engine, tmp_path):
    good = engine.export_quantized_model(tmp_path / "e.mixq")
    data = good.read_bytes()
    (tmp_path / "trunc.mixq").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="trunc.mixq: not a mixq engine file or truncated"):
        load_engine(tmp_path / "trunc.mixq")

    def flip(m):
        b = bytearray(m["model.onnx"])
        b[len(b) // 2] ^= 0xFF
        m["model.onnx"] = bytes(b)

    _rewrite(good, tmp_path / "flip.mixq", flip)
    with pytest.raises(EngineError, match="'model.onnx' is missing or corrupted"):
        load_engine(tmp_path / "flip.mixq")

    def future(m):
        man = json.loads(m["manifest.json"])
        man["format_version"] = 99
        m["manifest.json"] = json.dumps(man).encode()

    _rewrite(good, tmp_path / "future.mixq", future)
    with pytest.raises(EngineError, match="format version 99"):
        load_engine(tmp_path / "future.mixq")

    def other_backend(m):
        man = json.loads(m["manifest.json"])
        man["backend"] = "tensorrt"
        m["manifest.json"] = json.dumps(man).encode()

    _rewrite(good, tmp_path / "trt.mixq", other_backend)
    with pytest.raises(EngineError, match="built for backend 'tensorrt', not 'onnxruntime'"):
        get_backend("onnxruntime").load(tmp_path / "trt.mixq")
    (tmp_path / "junk.mixq").write_bytes(b"\x00" * 100)
    with pytest.raises(EngineError, match="not a mixq engine file"):
        load_engine(tmp_path / "junk.mixq")


def test_failed_save_keeps_previous_engine(engine, tmp_path, monkeypatch):
    path = engine.export_quantized_model(tmp_path / "e.mixq")
    before = path.read_bytes()
    monkeypatch.setattr(type(engine.engine), "members", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        engine.export_quantized_model(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.mixq"]


@pytest.mark.parametrize(
    "x, match",
    [
        (
            torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8),
            r"dtype must be float32, got torch.uint8 \(convert and normalize",
        ),
        (torch.randn(4, 1, 28, 28, dtype=torch.float64), "dtype must be float32, got torch.float64"),
        (torch.randn(4, 28, 28), r"shape must be \('batch', 1, 28, 28\), got \(4, 28, 28\)"),
        (torch.randn(4, 3, 28, 28), r"shape must be \('batch', 1, 28, 28\)"),
        (torch.randn(0, 1, 28, 28), "batch is empty"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN or infinite"),
        ([[1.0]], "must be a torch.Tensor or numpy array, got list"),
    ],
)
def test_bad_inference_input_is_a_clear_error(engine, x, match):
    with pytest.raises(EngineError, match=match):
        engine.inference(x)


def test_non_contiguous_and_numpy_inputs_work(engine):
    x = torch.randn(28, 28, 1, 4).permute(3, 2, 0, 1)
    assert not x.is_contiguous()
    out, _ = engine.inference(x)
    assert torch.equal(out, engine.inference(x.contiguous())[0])
    assert torch.equal(engine.inference(x.contiguous().numpy())[0], out)


def test_config_naming_a_missing_layer_is_an_error():
    calib = {"conv9": {"input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 1.0}}
    with pytest.raises(mixq.CalibrationFileError) as e:
        ModelSpeedup(TorchModel(), (1, 1, 28, 28), config=calib, backend="onnxruntime").compress()
    assert str(e.value) == (
        "the calibration config does not match TorchModel: layer 'conv9' is not in the model; "
        "it was made for a model with layers ['conv9']"
    )


def test_another_models_calibration_names_every_missing_layer(all8):
    calib = mixq.export_calibration(all8)
    with pytest.raises(mixq.CalibrationFileError) as e:
        ModelSpeedup(create_model("tiny_resnet"), (1, 3, 32, 32), config=calib, backend="onnxruntime").compress()
    assert str(e.value) == (
        "the calibration config does not match ResNetCifar: layers 'conv2', 'fc1', 'fc2', 'fc3' and 4 more are "
        "not in the model; it was made for a model with layers ['conv1', 'conv2', 'fc1', 'fc2', 'fc3', 'relu1', ...]"
    )


@pytest.mark.parametrize(
    "config, what",
    [
        (ALL_8BIT_CONFIG_LIST, "a list (a config_list?)"),
        ({"quant_types": ["weight"]}, "a config_list entry"),
    ],
)
def test_config_list_given_as_calibration_says_what_to_do(config, what):
    with pytest.raises(mixq.ConfigError) as e:
        ModelSpeedup(TorchModel(), (1, 1, 28, 28), config=config, backend="onnxruntime")
    assert str(e.value) == (
        f"config must be a calibration config (as export_model returns), got {what}; quantize with the config_list "
        "first (QAT_Quantizer(model, config_list, ...)) and pass the quantized model, or pass calib_data_loader=... "
        "with extra_layer_bits=8 for post-training calibration of every layer"
    )


def test_unbuildable_bits_name_the_layer():
    calib = {"fc1": {"input_bits": 4, "tracked_min_input": 0.0, "tracked_max_input": 1.0}}
    with pytest.raises(mixq.CalibrationFileError, match=r"layer 'fc1' asks for \[4\] bits"):
        ModelSpeedup(TorchModel(), (1, 1, 28, 28), config=calib, backend="onnxruntime").compress()


def test_sixteen_bit_layers_stay_float_on_ort_and_say_so():
    model = TorchModel().eval()
    mixq.prepare_(model, [{"quant_types": ["input", "weight"], "quant_bits": 16, "op_names": ["fc1"]}], mixq.QAT())
    model.train()
    model(torch.randn(8, 1, 28, 28))
    model.eval()
    report = ModelSpeedup(model, (4, 1, 28, 28), backend="onnxruntime").compress().report()
    (row,) = [r for r in report.rows if r.layer == "fc1"]
    assert row.requested == "fp16" and row.runs_as == "fp32" and "no fast fp16" in row.note


def test_model_without_config_follows_nnis_extra_layer_bits():
    """NNI: without a config every layer runs at extra_layer_bits: 32 float, 8 int8 from calib_data_loader
    (an error without it), 16 fp16 where the backend has fp16 kernels (ORT's CPU provider has none)."""
    model = TorchModel().eval()
    s = ModelSpeedup(model, (4, 1, 28, 28), backend="onnxruntime").compress()
    assert {r.requested for r in s.report().rows} == {"fp32"}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(s.inference(x)[0], model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(mixq.ConfigError, match=r"extra_layer_bits=8 without a config .* needs calib_data_loader"):
        ModelSpeedup(model, (1, 1, 28, 28), extra_layer_bits=8, backend="onnxruntime").compress()
    with pytest.raises(mixq.ConfigError, match="extra_layer_bits must be 8, 16 or 32, got 4"):
        ModelSpeedup(model, (1, 1, 28, 28), extra_layer_bits=4)
    fp16 = ModelSpeedup(model, (4, 1, 28, 28), extra_layer_bits=16, backend="onnxruntime").compress()
    rows = fp16.report().rows
    assert {r.requested for r in rows if r.op_type == "Conv2d"} == {"fp16"}
    assert all(r.note == "ORT CPU has no fast fp16 kernels: runs fp32" for r in rows if r.op_type == "Conv2d")
    with pytest.raises(EngineError, match="call compress"):
        ModelSpeedup(TorchModel(), (1, 1, 28, 28), backend="onnxruntime").inference(torch.randn(1, 1, 28, 28))


def test_ptq_straight_from_the_backend_with_calibration_cache(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    loader = [(torch.randn(8, 3, 32, 32), None) for _ in range(3)]
    cache = tmp_path / "calib.json"
    s = ModelSpeedup(
        model,
        (8, 3, 32, 32),
        calib_data_loader=loader,
        calibration_cache=cache,
        calibrate_type="percentile",
        extra_layer_bits=8,
        backend="onnxruntime",
    )
    s.compress()
    assert cache.is_file()
    rows = {r.layer: r for r in s.report().rows}
    assert rows["layer1.0.conv1"].runs_as == "int8" and rows["fc"].requested == "int8"
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    out, _ = s.inference(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 15
    cached = dict(calibration_cache=cache, calibrate_type="percentile", extra_layer_bits=8, backend="onnxruntime")
    again = ModelSpeedup(model, (8, 3, 32, 32), calib_data_loader=loader, **cached).compress()
    assert again._calibrated_model is None  # nothing calibrated: the cache was read
    assert torch.equal(again.inference(x)[0], out)  # the cached calibration, the same legalization data
    without_data = ModelSpeedup(model, (8, 3, 32, 32), calib_data_loader=[], **cached).compress()
    # the cache is enough to build; ORT then leaves the convs before residual adds in float
    out2 = without_data.inference(x)[0]
    assert float(10 * torch.log10(out.pow(2).mean() / (out - out2).pow(2).mean())) > 25


def test_calibration_cache_of_another_model_or_calibrator_is_replaced(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    loader = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    cache = tmp_path / "calibration.cache"  # NNI's name: JSON whatever the suffix
    opts = dict(calib_data_loader=loader, calibration_cache=cache, extra_layer_bits=8, backend="onnxruntime")
    ModelSpeedup(model, (8, 3, 32, 32), calibrate_type="minmax", **opts).compress()
    first = json.loads(cache.read_text())
    with pytest.warns(UserWarning, match="made for another model, layer config or calibrate_type"):
        s = ModelSpeedup(model, (8, 3, 32, 32), calibrate_type="percentile", **opts).compress()
    assert s._calibrated_model is not None and json.loads(cache.read_text()) != first
    other = create_model("tiny_resnet").eval()  # same architecture, other weights
    with pytest.warns(UserWarning, match="made for another model"):
        s = ModelSpeedup(other, (8, 3, 32, 32), calibrate_type="percentile", **opts).compress()
    assert s._calibrated_model is not None
    cache.write_bytes(b"TRT-8601-EntropyCalibration2\n")  # a TensorRT cache left by NNI
    with pytest.warns(UserWarning, match="not a mixq calibration cache"):
        ModelSpeedup(other, (8, 3, 32, 32), calibrate_type="percentile", **opts).compress()
    assert json.loads(cache.read_text())["__mixq_calibration_format__"] == 1


def test_tensorrt_speedup_without_tensorrt_points_to_auto():
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(EngineError, match="pass backend='auto' to build the fastest engine this machine has"):
        ModelSpeedupTensorRT(TorchModel(), (32, 1, 28, 28), config={}, batchsize=32)


def test_unknown_backend():
    with pytest.raises(EngineError, match="unknown backend 'tvm'"):
        get_backend("tvm")


def test_layer_of_node_handles_both_scope_styles():
    layers = {"conv1", "layer1.0.conv1", "relu1"}
    assert layer_of_node("/conv1/Conv", layers) == "conv1"
    assert layer_of_node("/layer1/layer1.0/conv1/Conv_token_3", layers) == "layer1.0.conv1"
    assert layer_of_node("/layer1/layer1.0/layer1.0.conv1/Conv", layers) == "layer1.0.conv1"
    assert layer_of_node("fused /relu1/module/Relu", layers) == "relu1"
    assert layer_of_node("/layer2/layer2.0/shortcut/shortcut.0/Conv", {"layer2.0.shortcut.0"}) == "layer2.0.shortcut.0"
    assert layer_of_node("Transpose_token_4", layers) is None


def test_uint8_weight_rewrite_keeps_the_grid(lenet):
    from onnx import numpy_helper

    qdq = export_qdq_onnx(mixq.deploy_model(lenet), (1, 1, 28, 28), mixq.export_calibration(lenet))
    before = {
        i.name: numpy_helper.to_array(i).astype(np.int32)
        for i in qdq.model.graph.initializer
        if i.data_type == 3 and len(i.dims) > 1
    }
    assert weights_to_uint8(qdq.model) == 4
    after = {i.name: numpy_helper.to_array(i).astype(np.int32) for i in qdq.model.graph.initializer}
    for name, q in before.items():
        np.testing.assert_array_equal(after[name], q + 128)
    assert isinstance(cpu_has_vnni(), bool)
    both = []
    for u in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            both.append(
                get_backend("onnxruntime").build(
                    export_qdq_onnx(mixq.deploy_model(lenet), (1, 1, 28, 28), mixq.export_calibration(lenet)),
                    (1, 1, 28, 28),
                    BuildOptions(uint8_weights=u),
                )
            )
        # int8 weights with |q| > 64 on a CPU without VNNI: the engine says it is not exact, and warns
        saturating = not u and not cpu_has_vnni()
        assert bool(both[-1].inexact) == saturating
        assert any("not exact on this CPU" in str(w.message) for w in caught) == saturating
    x = torch.randn(4, 1, 28, 28)
    if cpu_has_vnni():  # u8s8 kernels are exact with VNNI: both layouts give the same result
        assert torch.allclose(both[0].run(x), both[1].run(x), atol=1e-5)


def test_residual_model_with_bn_folding_exports_without_batchnorm():
    model = create_model("tiny_resnet")
    config = [
        {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    QAT_Quantizer(model, config, None, torch.randn(2, 3, 32, 32))
    model.train()
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 32, 32), mixq.export_calibration(model))
    ops = {n.op_type for n in qdq.model.graph.node}
    assert "BatchNormalization" not in ops and "Add" in ops
    s = ModelSpeedup(model, (8, 3, 32, 32), backend="onnxruntime").compress()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    out, _ = s.inference(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 25
    assert isinstance(nn.Identity(), nn.Module)


def test_seven_bit_weights_keep_int8_layout_and_match_the_model():
    torch.manual_seed(0)
    model = TorchModel()
    config = [
        {"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 7}, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    QAT_Quantizer(model, config)
    model.train()
    model(torch.randn(32, 1, 28, 28))
    model.eval()
    s = ModelSpeedup(model, (16, 1, 28, 28), backend="onnxruntime").compress()
    assert s.engine.uint8_weights is False  # |q| <= 63: u8 x s8 kernels cannot saturate
    assert all(r.runs_as == "int8" for r in s.report().rows if r.op_type == "Conv2d")
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    out, _ = s.inference(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 35


def _tutorial_style_resnet():
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    x = torch.randn(32, 3, 32, 32)
    return ptq_tutorial_style(model, x), x


def test_ort_legalization_calibrates_conv_outputs_feeding_residual_adds():
    """Conv inputs and weights quantized, outputs not (NNI's tutorial style): ORT would run the convs that
    feed a residual add in float. With calibration data, the ORT build calibrates those outputs and every
    conv runs int8; the report says which were calibrated; without data the note says what to do."""
    model, x = _tutorial_style_resnet()
    plain = ModelSpeedup(model, (32, 3, 32, 32), batchsize=32, backend="onnxruntime").compress()
    convs = {r.layer: r for r in plain.report().rows if r.op_type == "Conv2d"}
    floats = [r for r in convs.values() if r.runs_as == "fp32"]
    assert floats and all("pass calib_data_loader=..." in r.note for r in floats)
    legal = ModelSpeedup(
        model, (32, 3, 32, 32), batchsize=32, backend="onnxruntime", calib_data_loader=torch.split(x, 8)
    ).compress()
    rows = {r.layer: r for r in legal.report().rows if r.op_type in ("Conv2d", "Linear")}
    assert all(r.runs_as == "int8" for r in rows.values()), {k: r.runs_as for k, r in rows.items()}
    for r in floats:
        assert rows[r.layer].note.startswith("output calibrated at build time on 4 sample batches"), rows[r.layer]
    fresh = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        for inputs in (x, fresh):
            ref, out = model(inputs), legal.inference(inputs)[0]
            assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 30


def test_calibration_data_is_checked_and_a_tensor_is_split_into_batches():
    model, x = _tutorial_style_resnet()
    with pytest.raises(mixq.ConfigError, match=r"calib_data_loader batch 0: expected input batches shaped "):
        ModelSpeedup(
            model, (8, 3, 32, 32), batchsize=8, backend="onnxruntime", calib_data_loader=[torch.randn(8, 1, 28, 28)]
        ).compress()
    s = ModelSpeedup(model, (8, 3, 32, 32), batchsize=8, backend="onnxruntime", calib_data_loader=x)
    assert [tuple(b.shape) for b in s._calibration_batches()] == [(32, 3, 32, 32)]
    # A one-shot generator is read once and kept: PTQ's two histogram passes and the legalization all see it.
    ptq = ModelSpeedup(
        create_model("tiny_resnet").eval(),
        (8, 3, 32, 32),
        batchsize=8,
        extra_layer_bits=8,
        calibrate_type="percentile",
        backend="onnxruntime",
        calib_data_loader=(b for b in torch.split(x, 8)),
    ).compress()
    rows = [r for r in ptq.report().rows if r.op_type in ("Conv2d", "Linear")]
    assert all(r.runs_as == "int8" for r in rows), [(r.layer, r.runs_as) for r in rows]
