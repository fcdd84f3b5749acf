"""NNI's scheme/dtype control: ``set_quant_scheme_dtype`` and per-entry ``quant_scheme``/``quant_dtype`` give
NNI's behavior (NNI's defaults for the part not given, NNI's integer range, zero point and scale rules);
types left alone keep mixq's defaults. The reference math is NNI's documented QAT formulas, written here."""

import enum

import pytest
import torch

import mixq
from mixq.nni import QAT_Quantizer, set_quant_scheme_dtype
from mixq.nni.settings import quant_settings

from .cases import MODELS, batch, make, sqnr_db, train_steps


def nni_qparams(lo: float, hi: float, bits: int, dtype: str, symmetric: bool) -> tuple[float, int, int, int]:
    """NNI 2.x QAT: (scale, zero_point, qmin, qmax) for a tracked range, from its documented rules."""
    qmin, qmax = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if dtype == "int" else (0, 2**bits - 1)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(-lo, hi) / ((qmax - qmin) / 2)
        zero_point = (qmin + qmax) // 2 if dtype == "uint" else 0
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = qmin - round(lo / scale)
    return scale, min(max(zero_point, qmin), qmax), qmin, qmax


def _one_layer_qat(config):
    model = make("lenet")
    QAT_Quantizer(model, config, torch.optim.SGD(model.parameters(), lr=0.01))
    train_steps(model, "lenet", steps=2)
    return model


@pytest.mark.parametrize(
    "quant_type, scheme, dtype",
    [
        ("output", "per_tensor_symmetric", "uint"),  # zero point 127 (mixq's own rule: 128)
        ("output", "per_tensor_symmetric", "int"),
        ("output", "per_tensor_affine", "int"),  # qmin -127 (mixq's own range: -128)
        ("output", "per_tensor_affine", "uint"),
        ("input", "per_tensor_symmetric", "uint"),
    ],
)
def test_set_quant_scheme_dtype_gives_nnis_qparams(quant_type, scheme, dtype):
    set_quant_scheme_dtype(quant_type, scheme, dtype)
    layer = "relu3" if quant_type == "output" else "fc2"
    model = _one_layer_qat([{"quant_types": [quant_type], "quant_bits": 8, "op_names": [layer]}])
    entry = mixq.export_calibration(model)[layer]
    scale, zp, qmin, qmax = nni_qparams(
        entry[f"tracked_min_{quant_type}"], entry[f"tracked_max_{quant_type}"], 8, dtype, "symmetric" in scheme
    )
    assert entry[f"{quant_type}_scale"] == pytest.approx(scale, rel=1e-6)
    assert entry[f"{quant_type}_zero_point"] == zp
    spec = mixq.QuantSpec.from_dict(entry[f"{quant_type}_qspec"])
    assert (spec.dtype.qmin, spec.dtype.qmax, spec.scheme, spec.convention) == (qmin, qmax, scheme, "nni")


def test_fake_quant_output_follows_nnis_quantize_formula():
    """NNI: x -> round(clamp(x / scale + zero_point, qmin, qmax)), then (q - zero_point) * scale."""
    set_quant_scheme_dtype("output", "per_tensor_affine", "int")
    model = _one_layer_qat([{"quant_types": ["output"], "quant_bits": 8, "op_names": ["fc3"]}])
    entry = mixq.export_calibration(model)["fc3"]
    scale, zp, qmin, qmax = nni_qparams(entry["tracked_min_output"], entry["tracked_max_output"], 8, "int", False)
    wrapper = mixq.quantized_layers(model)["fc3"]
    x = torch.randn(64, 84) * 4  # beyond the tracked range too: clamped at qmin = -127
    with torch.no_grad():
        out = wrapper(x)
        plain = wrapper.module(x).double()
    expected = (torch.round(torch.clamp(plain / scale + zp, qmin, qmax)) - zp) * scale
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=scale * 1e-3)
    assert float(out.min()) >= (qmin - zp) * scale - 1e-6


def test_settings_apply_per_type_and_other_types_keep_mixq_defaults():
    set_quant_scheme_dtype("input", "per_tensor_symmetric", "int")
    entry = {"quant_types": ["input"], "quant_bits": 8, "op_names": ["fc1"]}
    specs = mixq.resolve_config(make("lenet"), [entry])  # resolver untouched by NNI's global settings
    assert specs["fc1"].input.scheme == "per_tensor_affine"  # mixq's default, not the setting above
    model = make("lenet")
    QAT_Quantizer(model, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_names": ["fc1"]}], None)
    spec = mixq.quantized_layers(model)["fc1"].layer_spec
    assert (spec.input.scheme, spec.input.dtype.signed, spec.input.convention) == ("per_tensor_symmetric", True, "nni")
    assert spec.weight == mixq.QuantSpec.from_nni(8, "per_channel_symmetric", "int")  # mixq's default, untouched


def test_partial_entry_settings_take_nnis_defaults_for_the_rest():
    """An entry giving only quant_dtype: NNI fills the scheme with its default (per_tensor_affine)."""
    model = make("lenet")
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["fc1"], "quant_dtype": "int"}]
    QAT_Quantizer(model, config, None)
    weight = mixq.quantized_layers(model)["fc1"].layer_spec.weight
    assert (weight.scheme, weight.dtype.qmin, weight.convention) == ("per_tensor_affine", -127, "nni")
    set_quant_scheme_dtype("weight", new_dtype="uint")  # only the dtype: NNI's scheme default stays
    model = make("lenet")
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["fc1"]}], None)
    weight = mixq.quantized_layers(model)["fc1"].layer_spec.weight
    assert (weight.scheme, weight.dtype.signed) == ("per_tensor_affine", False)
    assert quant_settings()["weight"] == {"quant_scheme": None, "quant_dtype": "uint"}


def test_entry_values_win_over_settings_and_config_list_is_not_changed():
    set_quant_scheme_dtype("weight", "per_tensor_affine", "uint")
    entry = {"quant_types": ["weight"], "quant_bits": 8, "op_names": ["fc1"]}
    config = [{**entry, "quant_scheme": "per_channel_symmetric"}]
    model = make("lenet")
    quantizer = QAT_Quantizer(model, config, None)
    weight = mixq.quantized_layers(model)["fc1"].layer_spec.weight
    assert (weight.scheme, weight.dtype.signed) == ("per_channel_symmetric", False)
    assert quantizer.config_list is config and "quant_convention" not in config[0]


class _NNIEnum(str, enum.Enum):  # NNI passes QuantType/QuantScheme/QuantDtype, str enums
    OUTPUT = "output"
    SYM = "per_tensor_symmetric"
    INT = "int"


def test_nni_string_enums_and_bad_values():
    set_quant_scheme_dtype(_NNIEnum.OUTPUT, _NNIEnum.SYM, _NNIEnum.INT)
    assert quant_settings()["output"] == {"quant_scheme": "per_tensor_symmetric", "quant_dtype": "int"}
    with pytest.raises(mixq.ConfigError, match="quant_type must be one of"):
        set_quant_scheme_dtype("bias", "per_tensor_affine")
    with pytest.raises(mixq.ConfigError, match="unknown scheme 'per_tensor'"):
        set_quant_scheme_dtype("weight", "per_tensor")
    with pytest.raises(mixq.ConfigError, match="unknown dtype 'int8'"):
        set_quant_scheme_dtype("weight", new_dtype="int8")


@pytest.mark.parametrize("name", MODELS)
def test_nni_int_symmetric_everywhere_trains_exports_and_builds(name, tmp_path):
    """QAT_torch_quantizer.py's settings (TensorRT-style int8 everywhere) through to an engine."""
    set_quant_scheme_dtype("weight", "per_channel_symmetric", "int")
    set_quant_scheme_dtype("output", "per_tensor_symmetric", "int")
    set_quant_scheme_dtype("input", "per_tensor_symmetric", "int")
    from .cases import CONFIG_LISTS, SHAPES

    model = make(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, CONFIG_LISTS[name], optimizer, dummy_input=batch(name, 2))
    train_steps(model, name, optimizer)
    x = batch(name, 8)
    with torch.no_grad():
        fake_quant = model(x)
    calibration = quantizer.export_model(tmp_path / "m.pth", tmp_path / "c.pth")
    for entry in calibration.values():
        for t in ("input", "weight", "output"):
            if f"{t}_zero_point" in entry:
                zps = entry[f"{t}_zero_point"]
                assert set(zps if isinstance(zps, list) else [zps]) == {0}
    from mixq.speedup import ModelSpeedup

    engine = ModelSpeedup(model, (8, *SHAPES[name]), config=calibration, batchsize=8, backend="onnxruntime")
    out = engine.compress().inference(x)[0]
    assert sqnr_db(fake_quant, out) > 30  # the engine computes the fake-quant model's integers


@pytest.mark.parametrize(
    "dtype, scheme, lo, hi",
    [
        ("uint", "per_tensor_symmetric", -1.0, 0.5),
        ("int", "per_tensor_affine", -0.3, 2.0),
        ("int", "per_tensor_symmetric", -2.0, 1.0),
    ],
)
def test_spec_level_nni_convention_matches_nnis_rules(dtype, scheme, lo, hi):
    spec = mixq.QuantSpec.from_nni(8, scheme, dtype, convention="nni")
    scale, zp = mixq.choose_qparams(lo, hi, spec)
    ref_scale, ref_zp, qmin, qmax = nni_qparams(lo, hi, 8, dtype, "symmetric" in scheme)
    assert float(scale) == pytest.approx(ref_scale, rel=1e-6) and int(zp) == ref_zp
    assert (spec.dtype.qmin, spec.dtype.qmax) == (qmin, qmax)
    mixq_spec = mixq.QuantSpec.from_nni(8, scheme, dtype)  # mixq's own rules are unchanged
    assert mixq_spec.dtype.qmin == (-128 if dtype == "int" else 0)
    if dtype == "uint" and "symmetric" in scheme:
        assert int(mixq.choose_qparams(lo, hi, mixq_spec)[1]) == 128 and ref_zp == 127
