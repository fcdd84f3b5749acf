import json
import math

import pytest
import torch

import mixq
from mixq import CalibrationFileError, load_calibration_config, save_calibration_config
from mixq.nni import QAT_Quantizer
from mixq.zoo.models import TorchModel
from mixq.zoo.tutorial import TUTORIAL_CONFIG_LIST


@pytest.fixture
def trained_quantizer():
    model = TorchModel()
    quantizer = QAT_Quantizer(model, TUTORIAL_CONFIG_LIST, None, torch.rand(32, 1, 28, 28))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 1, 28, 28))
    return quantizer


@pytest.mark.parametrize("suffix", [".json", ".pth"])
def test_export_model_twice_and_round_trip_is_exact(trained_quantizer, tmp_path, suffix):
    model_path, calib_path = tmp_path / "m.pth", tmp_path / f"calib{suffix}"
    first = trained_quantizer.export_model(model_path, calib_path)
    json.dumps(first, allow_nan=False)  # JSON-serializable as returned
    second = trained_quantizer.export_model(model_path, calib_path)  # NNI failed here
    assert first == second
    assert load_calibration_config(calib_path) == second
    state = torch.load(model_path, weights_only=True)
    assert set(state) == set(TorchModel().state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.pth", f"calib{suffix}"])  # no temp files left


def test_export_model_onnx(trained_quantizer, tmp_path):
    onnx = pytest.importorskip("onnx")
    trained_quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=(1, 1, 28, 28))
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    with pytest.raises(mixq.ConfigError, match="needs input_shape"):
        trained_quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "x.onnx")


def test_failed_save_keeps_previous_file(trained_quantizer, tmp_path):
    path = tmp_path / "calib.json"
    good = trained_quantizer.export_model(tmp_path / "m.pth", path)
    before = path.read_bytes()
    bad = {**good, "conv1": {**good["conv1"], "weight_scale": [float("nan")] * 6}}
    with pytest.raises(CalibrationFileError, match="'conv1': weight_scale must be finite"):
        save_calibration_config(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _entry(**over):
    e = {
        "input_bits": 8,
        "tracked_min_input": -1.0,
        "tracked_max_input": 2.0,
        "input_scale": 3 / 255,
        "input_zero_point": 85,
        "input_qspec": {"bits": 8, "dtype": "uint", "scheme": "per_tensor_affine", "axis": None},
        "weight_bits": 8,
        "weight_scale": [0.1, 0.2],
        "weight_zero_point": [0, 0],
        "weight_qspec": {"bits": 8, "dtype": "int", "scheme": "per_channel_symmetric", "axis": 0},
    }
    e.update(over)
    return e


@pytest.mark.parametrize(
    "entry, match",
    [
        (_entry(tracked_min_input=float("nan")), "tracked_min_input must be a finite number"),
        (_entry(tracked_max_input=float("inf")), "tracked_max_input must be a finite number"),
        (_entry(tracked_min_input=3.0), r"tracked_min_input \(3.0\) > tracked_max_input"),
        (_entry(weight_scale=[0.1, 0.0]), "weight_scale must be finite and > 0"),
        (_entry(weight_scale=[0.1, -1.0]), "weight_scale must be finite and > 0"),
        (_entry(weight_zero_point=[0, 300]), r"weight_zero_point 300 is outside the int8 range \[-128, 127\]"),
        (_entry(weight_zero_point=[0]), "weight_scale has 2 values but weight_zero_point has 1"),
        (_entry(input_bits=64), "input_bits must be an int in 2..16"),
        (_entry(input_bits="8"), "input_bits must be an int"),
        (_entry(input_qspec={"bits": 4, "dtype": "uint", "scheme": "per_tensor_affine", "axis": None}), "disagrees"),
        (_entry(input_qspec={"bits": 8, "dtype": "uint", "scheme": "bogus", "axis": None}), "input_qspec is invalid"),
        ("not a dict", "expected a dict, found str"),
    ],
)
def test_invalid_entries_name_file_layer_and_key(tmp_path, entry, match):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"conv1": entry}))
    with pytest.raises(CalibrationFileError, match=match) as e:
        load_calibration_config(path)
    assert str(path) in str(e.value)


def test_valid_handwritten_entry_loads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"conv1": _entry()}))
    assert load_calibration_config(path)["conv1"]["weight_scale"] == [0.1, 0.2]


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"conv1": {"input_bits": 8,', "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "expected a dict of layers, found list"),
        (b'{"__mixq_calibration_format__": 99}', "format version 99"),
    ],
)
def test_corrupt_json_files(tmp_path, content, match):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(CalibrationFileError, match=match):
        load_calibration_config(path)


def test_truncated_pth_and_missing_file(tmp_path, trained_quantizer):
    path = tmp_path / "c.pth"
    trained_quantizer.export_model(tmp_path / "m.pth", path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationFileError, match="cannot read as a calibration file"):
        load_calibration_config(path)
    with pytest.raises(CalibrationFileError, match="not found"):
        load_calibration_config(tmp_path / "nope.json")


def test_pth_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "c.pth"
    torch.save({"conv1": Evil()}, path)
    with pytest.raises(CalibrationFileError, match="cannot read"):
        load_calibration_config(path)


def test_nni_style_tensor_values_load(tmp_path):
    path = tmp_path / "nni.pth"
    torch.save(
        {"fc1": {"weight_bits": 8, "weight_scale": torch.tensor(0.01), "weight_zero_point": torch.tensor(3)}}, path
    )
    loaded = load_calibration_config(path)
    assert loaded["fc1"]["weight_zero_point"] == 3 and math.isclose(loaded["fc1"]["weight_scale"], 0.01, rel_tol=1e-6)


def test_unknown_suffix(tmp_path):
    with pytest.raises(CalibrationFileError, match="must end in .json or .pth"):
        save_calibration_config({}, tmp_path / "c.yaml")


def test_bits_only_config_is_told_apart_from_a_calibration():
    from mixq.calibration import is_bits_config

    assert is_bits_config({"conv1": {"weight_bits": 8, "output_bits": 8}, "fc1": {"weight_bits": 32}})
    assert not is_bits_config({"conv1": {"weight_bits": 8, "weight_scale": 0.1, "weight_zero_point": 0}})
    assert not is_bits_config({}) and not is_bits_config([{"quant_bits": 8}]) and not is_bits_config({"a": {}})


def test_calibration_cache_keeps_its_key_and_reads_back_only_with_it(trained_quantizer, tmp_path):
    from mixq.calibration import load_calibration_cache, save_calibration_cache

    calib = mixq.export_calibration(trained_quantizer.bound_model)
    path = tmp_path / "calibration.cache"  # NNI's name: JSON whatever the suffix
    save_calibration_cache(calib, path, key="abc")
    assert load_calibration_cache(path, "abc") == calib
    assert load_calibration_config(path.rename(tmp_path / "c.json")) == calib  # a plain calibration file too
    (tmp_path / "c.json").rename(path)
    with pytest.warns(UserWarning, match="made for another model"):
        assert load_calibration_cache(path, "other") is None
    assert load_calibration_cache(tmp_path / "missing.cache", "abc") is None


def test_torch_load_of_a_saved_pth_passes_back_in(trained_quantizer, tmp_path):
    from mixq.calibration import normalize_calibration_config

    calib = trained_quantizer.export_model(tmp_path / "m.pth", tmp_path / "c.pth")
    raw = torch.load(tmp_path / "c.pth", weights_only=True)
    assert "__mixq_calibration_format__" in raw
    assert normalize_calibration_config(raw) == calib
