"""The native two-verb API (``mixq.quantize``, ``mixq.compile``, ``mixq.load``) on a LeNet trained on real
MNIST: presets and config_lists, PTQ through ``forward_loop``, engines on ONNX Runtime, OpenVINO and ``auto``
against the fake-quant model, engine files, the README's quick start, and one-line errors.

Engine vs fake-quant model: top-1 agreement >= 99.5% (the project's target) on 2000 real test images, and an
SQNR floor set by the model itself: the engine must be at least 10 dB closer to the fake-quant model than the
fake-quant model is to the float model (its deviations carry at most a tenth of the power of the quantization
noise the config itself adds), on the real images and on fresh random inputs.
"""

import copy
import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mixq
import mixq._io
import mixq.backends
import mixq.speedup
from mixq.nni import QAT_Quantizer
from mixq.zoo.models import TorchModel
from mixq.zoo.tutorial import MnistTask, trainer

README = Path(__file__).resolve().parents[1] / "README.md"
MARGIN_DB = 10.0
BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def task(data_dir):
    return MnistTask(data_dir, train_limit=12_000, test_limit=2000)


@pytest.fixture(scope="module")
def float_model(task):
    """The tutorial LeNet after one epoch on 12k real MNIST images (fp32)."""
    torch.manual_seed(0)
    model = TorchModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    trainer(model, optimizer, F.nll_loss, task.train_loader(0))
    return model.eval()


@pytest.fixture(scope="module")
def calib(task):
    return task.train_set.tensors[0][:512]


def _loop(images):
    return lambda m: [m(b) for b in images.split(128)]


def _ptq(float_model, calib, config):
    return mixq.quantize(copy.deepcopy(float_model), config, forward_loop=_loop(calib))


@pytest.fixture(scope="module")
def int8_model(float_model, calib):
    return _ptq(float_model, calib, mixq.INT8)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = float((ref.double() - out.double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.double().pow(2).sum()) / noise)


def _fresh_random() -> torch.Tensor:
    return torch.randn(200, 1, 28, 28, generator=torch.Generator().manual_seed(1234)) * 1.5


def check_engine(engine, model, float_model, task) -> dict:
    """Engine vs fake-quant model on the real test images and fresh random inputs (see the module docstring)."""
    r = {}
    for name, x in (("real", task.test_set.tensors[0]), ("random", _fresh_random())):
        with torch.no_grad():
            fq, fl = model(x), float_model(x)
        out = torch.cat([engine(b) for b in x.split(500)])
        assert out.dtype == torch.float32 and out.shape == fq.shape
        r[name] = {
            "agreement": float((out.argmax(1) == fq.argmax(1)).float().mean()),
            "engine_vs_fake_quant_db": sqnr_db(fq, out),
            "fake_quant_vs_float_db": sqnr_db(fl, fq),
        }
    return r


def assert_matches_fake_quant(r: dict) -> None:
    assert r["real"]["agreement"] >= 0.995, r
    for name in ("real", "random"):
        floor = r[name]["fake_quant_vs_float_db"] + MARGIN_DB
        assert r[name]["engine_vs_fake_quant_db"] >= floor, (name, r)


# --- quantize -------------------------------------------------------------------------------------------------


def test_preset_name_and_written_out_config_list_give_the_same_calibration(float_model, calib):
    written = [  # what INT8 means, spelled as a config_list
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["default"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    by_preset = mixq.export_calibration(_ptq(float_model, calib, mixq.INT8))
    assert by_preset == mixq.export_calibration(_ptq(float_model, calib, written))
    assert by_preset == mixq.export_calibration(_ptq(float_model, calib, "int8"))
    assert set(by_preset) == {"conv1", "conv2", "fc1", "fc2", "fc3", "relu1", "relu2", "relu3", "relu4"}


def test_presets_resolve_against_the_model_and_are_frozen(float_model):
    assert mixq.W4A8.config_list(float_model)[0]["quant_bits"] == {"input": 8, "weight": 4}
    assert all(e["quant_dtype"] == "fp8" for e in mixq.FP8.config_list(float_model))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mixq.INT8.observer = "mse"
    mse = dataclasses.replace(mixq.INT8, observer="mse")
    assert {e["observer"] for e in mse.config_list(float_model)} == {"mse"}
    with pytest.raises(mixq.MixqError, match=r"preset 'INT8': weight_bits must be an int in 2\.\.8"):
        dataclasses.replace(mixq.INT8, weight_bits=16)
    with pytest.raises(mixq.MixqError, match="dtype must be 'int' or 'fp8', got 'bf16'"):
        mixq.Preset("BF16", dtype="bf16")


def test_ptq_forward_loop_calibrates_on_the_real_images(int8_model, calib):
    """minmax observers: conv1's input range is the calibration images' own min/max (both sides of zero)."""
    entry = mixq.export_calibration(int8_model)["conv1"]
    assert entry["tracked_min_input"] == pytest.approx(float(calib.min()), rel=1e-6)
    assert entry["tracked_max_input"] == pytest.approx(float(calib.max()), rel=1e-6)
    layers = mixq.quantized_layers(int8_model)
    assert layers and all(w.mode.value == "quantize" for w in layers.values())


def test_quantize_returns_the_model_it_was_given(float_model):
    model = copy.deepcopy(float_model)
    assert mixq.quantize(model, mixq.INT8) is model
    assert mixq.quantized_layers(model)


def test_qat_then_your_own_training_then_compile(float_model, task):
    model = mixq.quantize(copy.deepcopy(float_model), mixq.INT8, method=mixq.QAT())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(task.train_set, range(2048)), batch_size=128)
    trainer(model, optimizer, F.nll_loss, loader)
    model.eval()
    engine = mixq.compile(model, task.test_set.tensors[0][:100], backend="onnxruntime")
    assert_matches_fake_quant(check_engine(engine, model, float_model, task))


# --- compile --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["INT8", "W4A8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_the_fake_quant_model(float_model, calib, task, backend, preset):
    pytest.importorskip(backend)
    model = _ptq(float_model, calib, getattr(mixq, preset))
    engine = mixq.compile(model, task.test_set.tensors[0][:100], backend=backend)
    assert engine.backend == backend and not engine.engine.inexact
    assert {r.layer: r.runs_as for r in engine.placement()}["conv2"] == "int8"  # W4A8 too: int8 kernels
    assert_matches_fake_quant(check_engine(engine, model, float_model, task))


def test_fp8_engine_on_onnxruntime_matches_the_fake_quant_model(float_model, calib, task):
    model = _ptq(float_model, calib, mixq.FP8)
    engine = mixq.compile(model, task.test_set.tensors[0][:100], backend="onnxruntime")
    assert_matches_fake_quant(check_engine(engine, model, float_model, task))


def assert_auto_engine_matches(engine, model, float_model, task) -> None:
    """A quantized engine kept by ``auto`` must match the fake-quant model; a float one (every quantized engine
    was slower here) the float model, to fp32 rounding."""
    chosen = next(c for c in engine.selection.candidates if c.name == engine.selection.chosen)
    if chosen.quantized:
        assert_matches_fake_quant(check_engine(engine, model, float_model, task))
        return
    x = torch.cat([task.test_set.tensors[0], _fresh_random()])
    with torch.no_grad():
        ref = float_model(x)
    assert float((engine(x) - ref).abs().max()) < 1e-4


def test_auto_keeps_an_engine_that_matches_and_says_what_it_tried(int8_model, float_model, task):
    engine = mixq.compile(int8_model, task.test_set.tensors[0][:100])
    assert engine.backend in mixq.backends.list_backends()
    assert engine.selection is not None and any(c.quantized for c in engine.selection.candidates)
    assert "backend auto" in str(engine.report())
    assert_auto_engine_matches(engine, int8_model, float_model, task)


def test_numpy_in_torch_out(int8_model, task):
    x = task.test_set.tensors[0][:8]
    engine = mixq.compile(int8_model, x.numpy(), backend="onnxruntime")  # a numpy example too
    out = engine(x.numpy())
    assert isinstance(out, torch.Tensor) and torch.equal(out, engine(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(int8_model, task, tmp_path, backend):
    pytest.importorskip(backend)
    engine = mixq.compile(int8_model, task.test_set.tensors[0][:100], backend=backend)
    path = engine.save(tmp_path / "lenet.mixq")
    loaded = mixq.load(path)
    assert isinstance(loaded, mixq.CompiledModel) and loaded.backend == backend
    x = torch.cat([task.test_set.tensors[0][:100], _fresh_random()[:100]])
    assert torch.equal(loaded(x), engine(x))
    assert [r.runs_as for r in loaded.report().rows] == [r.runs_as for r in engine.report().rows]


def test_report_compares_with_float_when_compiled(int8_model, task):
    engine = mixq.compile(int8_model, task.test_set.tensors[0][:32], backend="onnxruntime")
    report = engine.report(compare_float=True, runs=3)
    assert report.times and report.float_times and report.batch == 32


def test_readme_quick_start_runs(float_model, calib, task, tmp_path, monkeypatch):
    """The first python block under '## Native API' in README.md, run as written."""
    section = README.read_text().split("## Native API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "mixq.quantize(" in code and "mixq.compile(" in code
    monkeypatch.chdir(tmp_path)
    calib_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(len(calib))), 128)
    ns = {"model": copy.deepcopy(float_model), "calib_loader": calib_loader, "images": task.test_set.tensors[0][:100]}
    exec(compile(code, str(README), "exec"), ns)
    engine, model = ns["engine"], ns["model"]
    assert isinstance(engine, mixq.CompiledModel) and mixq.quantized_layers(model)
    assert_auto_engine_matches(engine, model, float_model, task)


# --- errors: one MixqError line, before any export or build -----------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, mixq.MixqError) and message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("config", "method", "loop", "expected"),
    [
        ("int4", None, None, "unknown preset 'int4'; presets: INT8, FP8, W4A8"),
        (42, None, None, "config must be a preset (mixq.INT8, mixq.FP8, mixq.W4A8) or a config_list"),
        ({"quant_types": ["weight"]}, None, None, "config_list must be a list of dicts"),
        ("INT8", mixq.PTQ, None, "method must be an instance, e.g. mixq.PTQ(), not the class"),
        ("INT8", "ptq", None, "method must be mixq.PTQ(), QAT(), LSQ() or DoReFa(), got str"),
        ("INT8", None, [torch.zeros(1)], "forward_loop must be a function of the model"),
        ([], None, None, "config is empty: a config_list needs at least one entry"),
    ],
)
def test_bad_quantize_arguments(float_model, config, method, loop, expected):
    model = copy.deepcopy(float_model)
    with pytest.raises(mixq.MixqError) as e:
        mixq.quantize(model, config, loop, method)
    assert expected in _one_line(e)
    assert not mixq.quantized_layers(model)


def test_an_empty_config_list_is_refused_by_every_verb_that_resolves_one(float_model):
    """The check lives in the config resolver, so the native verb, the lower-level prepare_ and the NNI face agree."""
    for verb in (mixq.prepare_, mixq.resolve_config, lambda m, c: QAT_Quantizer(m, c, None), mixq.quantize):
        for empty in ((), [], {}):  # {}: prepare_ takes resolved specs as a mapping; an empty one is no config either
            model = copy.deepcopy(float_model)
            with pytest.raises(mixq.ConfigError) as e:
                verb(model, empty)
            assert _one_line(e).startswith("config is empty: ")
            assert not mixq.quantized_layers(model)


def test_quantize_takes_a_numpy_example_input_as_compile_does():
    """example_input folds each BatchNorm after a configured conv: a numpy array does it as a tensor does."""

    def conv_bn():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()

    example = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    from_numpy = mixq.quantize(conv_bn(), mixq.INT8, example_input=example)
    from_tensor = mixq.quantize(conv_bn(), mixq.INT8, example_input=torch.from_numpy(example))
    for model in (from_numpy, from_tensor):
        assert isinstance(model[1], torch.nn.Identity)  # the BatchNorm was folded into the conv
    assert from_numpy.state_dict().keys() == from_tensor.state_dict().keys()
    with pytest.raises(mixq.MixqError) as e:
        mixq.quantize(conv_bn(), mixq.INT8, example_input=[1.0, 2.0])
    assert "example_input must be a torch.Tensor or numpy array, got list" in _one_line(e)


def test_quantize_twice_is_an_error(int8_model):
    with pytest.raises(mixq.MixqError) as e:
        mixq.quantize(int8_model, mixq.INT8)
    assert "already prepared" in _one_line(e)


@pytest.mark.parametrize(
    ("example", "backend", "expected"),
    [
        (torch.randn(1, 3, 28, 28), "onnxruntime", "example_input of shape (1, 3, 28, 28) does not fit TorchModel"),
        (torch.zeros(1, 1, 28, 28, dtype=torch.int64), "onnxruntime", "example_input must be floating point"),
        (torch.full((1, 1, 28, 28), float("nan")), "onnxruntime", "example_input contains NaN or infinite values"),
        ([1.0, 2.0], "onnxruntime", "example_input must be a torch.Tensor or numpy array, got list"),
        (torch.randn(1, 1, 28, 28), "tflite", "unknown backend 'tflite'; available: ['auto', "),
    ],
)
def test_bad_compile_arguments(int8_model, example, backend, expected):
    with pytest.raises(mixq.MixqError) as e:
        mixq.compile(int8_model, example, backend=backend)
    message = _one_line(e)
    assert expected in message and "dummy_input" not in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"threads": 0}, "threads must be a positive int or None, got 0"),
        ({"threads": -2}, "threads must be a positive int or None, got -2"),
        ({"threads": True}, "threads must be a positive int or None, got True"),
        ({"threads": 2.0}, "threads must be a positive int or None, got 2.0"),
        ({"threads": "4"}, "threads must be a positive int or None, got '4'"),
        ({"max_batch": 0}, "max_batch must be a positive int or None, got 0"),
        ({"max_batch": 3}, "max_batch=3 is smaller than example_input's batch 4: "),
        ({"float_glue": "bf16"}, "float_glue must be 'fp32' or 'fp16' (the cuda backend's float ops), got 'bf16'"),
    ],
)
def test_bad_threads_and_max_batch_are_one_line_before_any_build(int8_model, monkeypatch, options, expected):
    def no_build(*args, **kwargs):
        raise AssertionError("build work started before the arguments were checked")

    monkeypatch.setattr(mixq.speedup, "ModelSpeedup", no_build)
    monkeypatch.setattr(mixq.speedup, "export_qdq_onnx", no_build)
    with pytest.raises(mixq.ConfigError) as e:
        mixq.compile(int8_model, torch.randn(4, 1, 28, 28), backend="onnxruntime", **options)
    assert expected in _one_line(e)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_a_backend_this_machine_lacks_is_one_line_before_any_export(int8_model, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported before the backend was checked")

    monkeypatch.setattr(mixq.speedup, "export_qdq_onnx", no_export)
    with pytest.raises(mixq.MixqError) as e:
        mixq.compile(int8_model, torch.randn(2, 1, 28, 28), backend="tensorrt")
    assert "backend 'tensorrt' needs TensorRT" in _one_line(e)


def test_activations_below_8_bits_are_training_only_and_compile_says_so(float_model, calib):
    model = _ptq(float_model, calib, mixq.Preset("W4A4", weight_bits=4, activation_bits=4))
    with pytest.raises(mixq.MixqError) as e:
        mixq.compile(model, torch.randn(2, 1, 28, 28), backend="onnxruntime")
    assert "layer 'conv1' asks for [4] bits; engines build int8 layers (8-bit activations" in _one_line(e)


def test_compile_before_calibration_names_the_layer(float_model):
    model = mixq.quantize(copy.deepcopy(float_model), mixq.INT8)  # PTQ without a loop: prepared only
    with pytest.raises(mixq.MixqError) as e:
        mixq.compile(model, torch.randn(1, 1, 28, 28), backend="onnxruntime")
    assert "layer 'conv1': its input was never observed" in _one_line(e)
    assert all(
        w.input_quantizer is None or not w.input_quantizer.initialized for w in mixq.quantized_layers(model).values()
    )  # fmt: skip  (the check observed nothing)


def test_bad_engine_input_and_files(int8_model, task, tmp_path):
    engine = mixq.compile(int8_model, task.test_set.tensors[0][:4], backend="onnxruntime")
    with pytest.raises(mixq.MixqError) as e:
        engine(torch.randn(2, 1, 27, 28))
    assert "input shape must be ('batch', 1, 28, 28), got (2, 1, 27, 28)" in _one_line(e)
    with pytest.raises(mixq.MixqError) as e:
        engine(np.zeros((2, 1, 28, 28)))  # float64
    assert "input dtype must be float32" in _one_line(e)
    with pytest.raises(mixq.MixqError) as e:
        mixq.load(tmp_path / "missing.mixq")
    assert "engine file not found" in _one_line(e)
    (tmp_path / "junk.mixq").write_bytes(b"not a zip")
    with pytest.raises(mixq.MixqError) as e:
        mixq.load(tmp_path / "junk.mixq")
    assert "not a mixq engine file" in _one_line(e)
    loaded = mixq.load(engine.save(tmp_path / "e.mixq"))
    with pytest.raises(mixq.MixqError) as e:
        loaded.report(compare_float=True)
    assert "needs the model" in _one_line(e)


def test_save_to_an_unwritable_path_is_one_engine_error_and_keeps_the_previous_file(int8_model, task, tmp_path):
    engine = mixq.compile(int8_model, task.test_set.tensors[0][:4], backend="onnxruntime")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder.mixq").mkdir()
    for path, cause in (
        (tmp_path / "a-file" / "e.mixq", f"{tmp_path / 'a-file'} is a file, so nothing can be created under it"),
        (tmp_path / "a-folder.mixq", "is a folder, not a file"),
    ):
        with pytest.raises(mixq.backends.EngineError) as e:
            engine.save(path)
        assert _one_line(e) == f"{path}: cannot write the engine file ({cause})"
    previous = engine.save(tmp_path / "e.mixq").read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mixq._io.os, "replace", disk_full)  # the last step of the atomic write fails
        with pytest.raises(mixq.backends.EngineError) as e:
            engine.save(tmp_path / "e.mixq")
    assert _one_line(e) == f"{tmp_path / 'e.mixq'}: cannot write the engine file (No space left on device)"
    assert (tmp_path / "e.mixq").read_bytes() == previous  # the write stayed atomic: the old engine is intact
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(mixq.backends.EngineError, match="cannot write the engine file"):  # the engine's own save
        engine.engine.save(tmp_path / "a-file" / "e.mixq")
