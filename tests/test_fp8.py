"""fp8 (e4m3) end to end in the front end: spec, primitives, config, calibration files, the Q/DQ ONNX form."""

import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

import mixq
from engine_cases import randomize_batchnorm
from mixq._errors import CalibrationFileError, ConfigError
from mixq.calibration import load_calibration_config, normalize_calibration_config, save_calibration_config
from mixq.config import resolve_config
from mixq.export import FP8_OPSET, LAYERS_METADATA_KEY, OPSET, export_qdq_onnx, layer_precisions
from mixq.primitives import (
    FP8_TORCH_DTYPE,
    SCALE_EPS,
    choose_qparams,
    choose_qparams_from_tensor,
    dequantize,
    fake_quantize,
    fake_quantize_fp8,
    fake_quantize_lsq,
    quantize,
)
from mixq.quantization.model import find_conv_bn_pairs
from mixq.spec import FP8_E4M3, FloatType, PerChannel, PerTensor, QuantSpec
from mixq.speedup import all_fp8_config, all_int8_config
from mixq.zoo.models import create_model

FP8_PT = QuantSpec(FP8_E4M3, symmetric=True)
FP8_PC = QuantSpec(FP8_E4M3, symmetric=True, granularity=PerChannel(0))

# Every finite e4m3fn value, decoded from its bit pattern (0x7F / 0xFF are NaN): the reference grid.
_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
_VALUES = _CODES.view(FP8_TORCH_DTYPE).float()
_FINITE = ~torch.isnan(_VALUES)
GRID_CODES, GRID = _CODES[_FINITE].long(), _VALUES[_FINITE].double()


def ref_round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value of each ``v`` (float64) after saturating to [-448, 448], ties to the even code: a
    brute-force search over the decoded grid, independent of torch's cast."""
    v = v.double().clamp(-448, 448).reshape(-1, 1)
    dist = (v - GRID.reshape(1, -1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    even = (GRID_CODES % 2 == 0).reshape(1, -1)
    pick = torch.where((tied & even).any(dim=1, keepdim=True), tied & even, tied)
    values = torch.where(pick, GRID.reshape(1, -1), torch.zeros(1, dtype=torch.float64)).sum(dim=1)
    # +0 and -0 both tie for 0: the sum is 0 either way.
    return values


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
scales = st.floats(2.0**-20, 2.0**10, allow_nan=False, width=32)


# ---------------------------------------------------------------------------------------------------------------
# spec


def test_float_type_is_e4m3_only():
    assert FloatType() == FP8_E4M3 and (FP8_E4M3.bits, FP8_E4M3.name, FP8_E4M3.max) == (8, "fp8_e4m3", 448.0)
    with pytest.raises(ConfigError, match="only fp8_e4m3"):
        FloatType(bits=8, name="fp8_e5m2", max=57344.0)


@pytest.mark.parametrize("spec", [FP8_PT, FP8_PC], ids=["per_tensor", "per_channel"])
def test_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert d == {"bits": 8, "dtype": "fp8", "scheme": spec.scheme, "axis": spec.axis}
    assert QuantSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert spec.is_float


@pytest.mark.parametrize(
    ("bits", "scheme", "convention", "match"),
    [
        (4, "per_tensor_symmetric", "mixq", "fp8 needs 8 bits"),
        (8, "per_tensor_affine", "mixq", "symmetric"),
        (8, "per_channel_affine", "mixq", "symmetric"),
        (8, "per_tensor_symmetric", "nni", "integer types"),
    ],
)
def test_spec_rejects_what_fp8_cannot_be(bits, scheme, convention, match):
    with pytest.raises(ConfigError, match=match):
        QuantSpec.from_nni(bits, scheme, "fp8", convention=convention)


# ---------------------------------------------------------------------------------------------------------------
# primitives


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-1e4, 0, allow_nan=False), hi=st.floats(0, 1e4, allow_nan=False))
def test_qparams_are_amax_over_448_with_zero_point_zero(lo, hi):
    scale, zp = choose_qparams(lo, hi, FP8_PT)
    expected = np.float32(max(max(-lo, hi) / 448.0, SCALE_EPS))
    assert scale.dtype == torch.float32 and float(scale) == expected
    assert zp.dtype == torch.int32 and int(zp) == 0


def test_per_channel_qparams_are_per_channel_amax():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).reshape(-1, 1, 1, 1)
    scale, zp = choose_qparams_from_tensor(w, FP8_PC)
    amax = w.abs().amax(dim=(1, 2, 3)).double()
    assert torch.equal(scale, (amax / 448).clamp(min=SCALE_EPS).float())
    assert torch.equal(zp, torch.zeros(6, dtype=torch.int32))


@settings(max_examples=300, deadline=None)
@given(xs=st.lists(finite32, min_size=1, max_size=64), scale=scales)
def test_quantize_rounds_to_nearest_even_and_saturates(xs, scale):
    x = torch.tensor(xs, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    q = quantize(x, s, None, FP8_E4M3)
    assert q.dtype == FP8_TORCH_DTYPE
    v = x / s  # the division in float32, as ONNX QuantizeLinear does
    assert torch.equal(q.double(), ref_round_e4m3(v))  # the brute-force nearest-even reference
    assert torch.equal(q, v.clamp(-448, 448).to(FP8_TORCH_DTYPE))  # torch's own cast
    assert float(q.float().abs().max()) <= 448
    fq = fake_quantize(x, s, torch.zeros((), dtype=torch.int32), FP8_E4M3)
    assert torch.equal(fq, dequantize(q, s, torch.zeros(())))
    assert torch.equal(fq, q.float() * s)


def test_ties_go_to_the_even_code():
    """Every midpoint between two neighbouring positive grid values (exact in float32) rounds to the even code."""
    pos = GRID[GRID > 0].sort().values
    mids = ((pos[:-1] + pos[1:]) / 2).float()
    q = quantize(mids, torch.tensor(1.0), None, FP8_E4M3)
    codes = q.view(torch.uint8).long()
    assert bool((codes % 2 == 0).all())
    assert torch.equal(q.double(), ref_round_e4m3(mids.double()))
    assert torch.equal(quantize(-mids, torch.tensor(1.0), None, FP8_E4M3).double(), -q.double())


@settings(max_examples=100, deadline=None)
@given(scale=scales, factor=st.floats(1.0, 1e6, allow_nan=False))
def test_saturation_at_448_steps(scale, factor):
    s = torch.tensor(scale, dtype=torch.float32)
    x = torch.tensor([448.0, -448.0, 449.0, -500.0]) * s * factor
    fq = fake_quantize_fp8(x, s)
    assert torch.equal(fq.abs(), torch.full((4,), 448.0) * s)
    assert torch.equal(torch.sign(fq), torch.sign(x))


@settings(max_examples=50, deadline=None)
@given(scale=scales)
def test_zero_maps_to_zero(scale):
    s = torch.tensor(scale, dtype=torch.float32)
    x = torch.tensor([0.0, -0.0])
    assert torch.equal(fake_quantize_fp8(x, s).abs(), torch.zeros(2))
    assert torch.equal(quantize(x, s, None, FP8_E4M3).float().abs(), torch.zeros(2))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), axis=st.integers(0, 2))
def test_per_channel_equals_each_channel_per_tensor(seed, axis):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, generator=g) * 10
    s = torch.rand(x.shape[axis], generator=g) * 0.05 + 1e-3
    out = fake_quantize(x, s, torch.zeros(x.shape[axis], dtype=torch.int32), FP8_E4M3, axis)
    for c in range(x.shape[axis]):
        assert torch.equal(out.select(axis, c), fake_quantize_fp8(x.select(axis, c), s[c]))


@settings(max_examples=100, deadline=None)
@given(xs=st.lists(finite32, min_size=1, max_size=64), scale=scales)
def test_gradient_is_straight_through_inside_the_range(xs, scale):
    x = torch.tensor(xs, dtype=torch.float32, requires_grad=True)
    s = torch.tensor(scale, dtype=torch.float32)
    fake_quantize_fp8(x, s).backward(torch.arange(1, len(xs) + 1, dtype=torch.float32))
    inside = (x.detach() / s).abs() <= 448
    assert torch.equal(x.grad, torch.where(inside, torch.arange(1, len(xs) + 1, dtype=torch.float32), 0.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_are_quantized_in_float32(dtype):
    x = (torch.randn(1000) * 5).to(dtype)
    s = torch.tensor(0.01)
    out = fake_quantize_fp8(x, s)
    assert out.dtype == dtype
    assert torch.equal(out, fake_quantize_fp8(x.float(), s).to(dtype))


def test_lsq_primitive_rejects_fp8():
    with pytest.raises(ValueError, match="fp8"):
        fake_quantize_lsq(torch.randn(4), torch.tensor(0.1), torch.tensor(0), FP8_E4M3)


# ---------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_for_fp8_are_symmetric():
    model = create_model("lenet")
    specs = resolve_config(model, all_fp8_config(model))
    conv = specs["conv1"]
    assert conv.input == QuantSpec(FP8_E4M3, True, PerTensor())
    assert conv.weight == QuantSpec(FP8_E4M3, True, PerChannel(0))
    assert specs["relu1"].output == QuantSpec(FP8_E4M3, True, PerTensor())
    # all_fp8_config covers exactly what all_int8_config does
    int8 = resolve_config(create_model("lenet"), all_int8_config(model))
    assert {n: s.quant_types for n, s in specs.items()} == {n: s.quant_types for n, s in int8.items()}


def test_config_mixes_fp8_and_int_per_type_and_per_layer():
    model = create_model("lenet")
    specs = resolve_config(
        model,
        [
            {"quant_types": ["input", "weight"], "quant_bits": 8, "quant_dtype": "fp8", "op_types": ["Conv2d"]},
            {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
        ],
    )
    assert specs["conv2"].weight.is_float and not specs["fc1"].weight.is_float


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"quant_bits": 4}, r"config_list\[1\]\['quant_bits'\]: fp8 needs quant_bits 8, got 4 for 'input'"),
        (
            {"quant_bits": {"input": 8, "weight": 6}},
            r"config_list\[1\]\['quant_bits'\]: fp8 needs quant_bits 8, got 6 for 'weight'",
        ),
        ({"quant_scheme": "per_tensor_affine"}, r"config_list\[1\]\['quant_scheme'\]: fp8 is symmetric"),
        ({"quant_convention": "nni"}, r"config_list\[1\]\['quant_convention'\]: NNI's convention"),
        ({"observer": "entropy"}, r"config_list\[1\]\['observer'\]: the entropy observer"),
        ({"quant_dtype": "fp16"}, r"config_list\[1\]\['quant_dtype'\]: unknown dtype 'fp16'.*'fp8'"),
        (
            {"quant_dtype": {"input": "uint", "weight": "fp8"}},
            r"config_list\[1\]\['quant_dtype'\]: \['weight'\] fp8 but \['input'\] integer: a layer is fp8 throughout",
        ),
    ],
)
def test_config_errors_name_entry_and_key(entry, match):
    model = create_model("lenet")
    base = {"quant_types": ["input", "weight"], "quant_bits": 8, "quant_dtype": "fp8", "op_types": ["Linear"]}
    config = [{"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]}, {**base, **entry}]
    with pytest.raises(ConfigError, match=match):
        resolve_config(model, config)


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile", "mse"])
def test_observers_work_for_fp8(observer):
    model = create_model("tiny_mlp").eval()
    x = torch.randn(64, 16)
    mixq.prepare_(model, all_fp8_config(model, observer=observer), mixq.PTQ(), example_input=x[:1])
    mixq.calibrate_(model, lambda m: m(x))
    calib = mixq.export_calibration(model)
    assert calib["fc1"]["input_qspec"]["dtype"] == "fp8" and calib["fc1"]["input_zero_point"] == 0
    lo, hi = calib["fc1"]["tracked_min_input"], calib["fc1"]["tracked_max_input"]
    assert calib["fc1"]["input_scale"] == pytest.approx(max(-lo, hi) / 448, rel=1e-6)


@pytest.mark.parametrize("method", [mixq.LSQ(), mixq.DoReFa()], ids=["LSQ", "DoReFa"])
def test_lsq_and_dorefa_reject_fp8_at_prepare(method):
    model = create_model("tiny_mlp")
    config = [{"quant_types": ["weight"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": ["fc2"]}]
    with pytest.raises(ConfigError, match=rf"layer 'fc2' \(weight\): {type(method).__name__} learns an integer grid"):
        mixq.prepare_(model, config, method)
    assert not any(isinstance(m, mixq.QuantWrapper) for m in model.modules())  # nothing was wrapped


# ---------------------------------------------------------------------------------------------------------------
# calibration files


def ptq_fp8(name: str, shape, config=None, seed: int = 0, fold: bool = True):
    """A registered model with non-trivial BatchNorm statistics, PTQ-calibrated in fp8 on random inputs."""
    torch.manual_seed(seed)
    model = create_model(name).eval()
    randomize_batchnorm(model, weight_low=-1.5)  # negative factors too: the export's BN fold flips signs
    x = torch.randn(64, *shape[1:])
    mixq.prepare_(model, config or all_fp8_config(model), mixq.PTQ(), example_input=x[:1] if fold else None)
    mixq.calibrate_(model, lambda m: m(x))
    return model


@pytest.mark.parametrize("suffix", [".json", ".pth"])
def test_calibration_file_round_trip(tmp_path, suffix):
    model = ptq_fp8("tiny_resnet", (1, 3, 16, 16))
    calib = mixq.export_calibration(model)
    path = save_calibration_config(calib, tmp_path / f"c{suffix}")
    loaded = load_calibration_config(path)
    assert loaded == normalize_calibration_config(calib)
    entry = loaded["layer1.0.conv1"]
    assert entry["weight_bits"] == 8 and entry["input_bits"] == 8
    assert entry["weight_qspec"] == {"bits": 8, "dtype": "fp8", "scheme": "per_channel_symmetric", "axis": 0}
    assert entry["input_qspec"] == {"bits": 8, "dtype": "fp8", "scheme": "per_tensor_symmetric", "axis": None}
    assert entry["weight_zero_point"] == [0] * 8 and entry["input_zero_point"] == 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"input_zero_point": 3}, r"layer 'fc1': input_zero_point must be 0 for fp8"),
        ({"weight_zero_point": [0] * 31 + [1]}, r"layer 'fc1': weight_zero_point must be 0 for fp8"),
        (
            {"input_qspec": {"bits": 8, "dtype": "fp8", "scheme": "per_tensor_affine", "axis": None}},
            r"layer 'fc1': input_qspec is invalid \(fp8 quantization is symmetric",
        ),
        ({"input_bits": 4}, r"layer 'fc1': input_bits 4 disagrees with input_qspec bits 8"),
        (
            {
                "input_bits": 4,
                "input_qspec": {"bits": 4, "dtype": "fp8", "scheme": "per_tensor_symmetric", "axis": None},
            },
            r"layer 'fc1': input_qspec is invalid \(fp8 needs 8 bits",
        ),
    ],
)
def test_calibration_validation_names_layer_and_key(change, match):
    model = ptq_fp8("tiny_mlp", (1, 16))
    calib = mixq.export_calibration(model)
    calib["fc1"].update(change)
    with pytest.raises(CalibrationFileError, match=match):
        normalize_calibration_config(calib, source="c.json")


# ---------------------------------------------------------------------------------------------------------------
# export


def _initializers(proto):
    return {i.name: i for i in proto.graph.initializer}


def test_export_form_follows_the_contract():
    model = ptq_fp8("tiny_resnet", (1, 3, 16, 16))
    calib = mixq.export_calibration(model)
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 16, 16), calib)
    proto = qdq.model
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", FP8_OPSET)]
    inits = _initializers(proto)
    nodes = list(proto.graph.node)
    assert {n.op_type for n in nodes} <= {
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Relu",
        "Add",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    }
    quantizes = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dequantizes = [n for n in nodes if n.op_type == "DequantizeLinear"]
    weighted = [n for n, e in calib.items() if "weight_bits" in e]
    activations = sum(f"{t}_bits" in e for e in calib.values() for t in ("input", "output"))
    assert len(quantizes) == activations and len(dequantizes) == activations + len(weighted)
    for n in quantizes:
        scale, zp = inits[n.input[1]], inits[n.input[2]]
        assert scale.data_type == TensorProto.FLOAT and list(scale.dims) == []
        assert zp.data_type == TensorProto.FLOAT8E4M3FN and list(zp.dims) == [] and zp.raw_data == b"\x00"
        assert not any(a.name == "saturate" for a in n.attribute)  # the default, 1
    weight_dqs = [n for n in dequantizes if n.input[0] in inits]
    assert len(weight_dqs) == len(weighted)
    for n in weight_dqs:
        w, scale, zp = (inits[i] for i in n.input)
        assert w.data_type == TensorProto.FLOAT8E4M3FN
        assert scale.data_type == TensorProto.FLOAT and list(scale.dims) == [w.dims[0]]
        assert zp.data_type == TensorProto.FLOAT8E4M3FN and list(zp.dims) == [w.dims[0]]
        assert zp.raw_data == bytes(w.dims[0])
        assert [(a.name, a.i) for a in n.attribute] == [("axis", 0)]
    # bias stays float: no int32 bias DequantizeLinear for fp8 layers
    gemm = next(n for n in nodes if n.op_type == "Gemm")
    assert inits[gemm.input[2]].data_type == TensorProto.FLOAT
    layers = json.loads(next(p.value for p in proto.metadata_props if p.key == LAYERS_METADATA_KEY))
    assert {n: info["precision"] for n, info in layers.items() if n in calib} == dict.fromkeys(calib, "fp8")
    assert layers["avgpool"]["precision"] == "fp32"
    assert qdq.layers == layers and qdq.requests_quantized


@pytest.mark.parametrize("fold", [True, False], ids=["quantizer_folds_bn", "export_folds_bn"])
def test_exported_weights_are_the_fake_quant_weights(fold):
    """Each fp8 weight initializer holds the fp8 values the fake-quant model computes with, bit for bit: with the
    BatchNorm folded by the quantizer, the same weights and scales; folded by the export (no example input), the
    same fp8 values times sign(gamma) with the scales times |gamma / sigma| (e4m3 is symmetric about 0)."""
    model = ptq_fp8("tiny_resnet", (1, 3, 16, 16), fold=fold)
    calib = mixq.export_calibration(model)
    proto = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 16, 16), calib).model
    inits = _initializers(proto)
    dqs = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    modules = dict(model.named_modules())
    pairs = find_conv_bn_pairs(create_model("tiny_resnet"))
    assert len(pairs) == 6  # every conv has a BatchNorm: the quantizer or the export folds it
    for name, w in mixq.quantized_layers(model).items():
        if w.weight_quantizer is None:
            continue
        weight, _ = w.folded_weight_and_bias()
        weight = weight.detach()
        scale = torch.tensor(calib[name]["weight_scale"])
        node = dqs[f"{name}.module.weight_quantized"]
        q = torch.frombuffer(bytearray(inits[node.input[0]].raw_data), dtype=torch.uint8).view(FP8_TORCH_DTYPE)
        q = q.float().reshape(weight.shape)
        stored_scale = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        expected_q = quantize(weight, scale, None, FP8_E4M3, 0).float()
        if name in pairs and not fold:
            bn = modules[pairs[name]]
            factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
            expected_q = expected_q * torch.sign(factor).reshape(-1, 1, 1, 1)
            assert torch.allclose(stored_scale, scale * factor.abs(), rtol=1e-6), name
        else:
            assert torch.equal(stored_scale, scale), name
            shape = (-1, *[1] * (weight.dim() - 1))
            assert torch.equal(q * stored_scale.reshape(shape), w.weight_quantizer(weight)), name
        assert torch.equal(q, expected_q), name


def test_int8_only_export_keeps_opset_13_and_mixed_models_take_both_forms():
    int8 = ptq_fp8("lenet", (1, 1, 28, 28), config=all_int8_config(create_model("lenet")))
    proto = export_qdq_onnx(mixq.deploy_model(int8), (1, 1, 28, 28), mixq.export_calibration(int8)).model
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert all(i.data_type != TensorProto.FLOAT8E4M3FN for i in proto.graph.initializer)

    mixed_config = [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": ["conv1", "conv2"]},
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "quant_dtype": "fp8", "op_names": ["relu1"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu3"]},
    ]
    mixed = ptq_fp8("lenet", (1, 1, 28, 28), config=mixed_config)
    qdq = export_qdq_onnx(mixq.deploy_model(mixed), (1, 1, 28, 28), mixq.export_calibration(mixed))
    onnx.checker.check_model(qdq.model, full_check=True)
    assert [o.version for o in qdq.model.opset_import] == [FP8_OPSET]
    precisions = {n: info["precision"] for n, info in qdq.layers.items()}
    assert precisions["conv1"] == precisions["relu1"] == "fp8" and precisions["fc1"] == precisions["relu3"] == "int8"
    inits = _initializers(qdq.model)
    zp_types = {
        n.name.split("/")[1]: inits[n.input[2]].data_type if n.input[2] in inits else "const"
        for n in qdq.model.graph.node
        if n.op_type == "QuantizeLinear"
    }
    assert zp_types["conv1"] == zp_types["relu1"] == TensorProto.FLOAT8E4M3FN
    assert zp_types["fc1"] != TensorProto.FLOAT8E4M3FN
    # int8 layers keep their int32 Gemm bias
    assert any(i.data_type == TensorProto.INT32 and i.name.startswith("fc1.") for i in qdq.model.graph.initializer)


def test_layer_mixing_fp8_and_int_is_an_error_naming_it():
    model = ptq_fp8("tiny_mlp", (1, 16))
    calib = mixq.export_calibration(model)
    calib["fc2"]["input_qspec"] = {"bits": 8, "dtype": "uint", "scheme": "per_tensor_affine", "axis": None}
    calib["fc2"]["input_zero_point"] = 128
    with pytest.raises(CalibrationFileError, match=r"layer 'fc2' mixes fp8 \(weight\) and integer \(input\)"):
        layer_precisions(calib)
    with pytest.raises(CalibrationFileError, match="layer 'fc2' mixes fp8"):
        export_qdq_onnx(mixq.deploy_model(model), (1, 16), calib)


def test_weight_range_without_scale_gets_the_fp8_scale():
    """An entry recording only the weight's range (NNI's ObserverQuantizer style) gets amax / 448 for fp8."""
    qspec = {"bits": 8, "dtype": "fp8", "scheme": "per_tensor_symmetric", "axis": None}
    entry = {"weight_bits": 8, "weight_qspec": qspec, "tracked_min_weight": -0.9, "tracked_max_weight": 0.5}
    out = normalize_calibration_config({"fc1": entry})
    assert out["fc1"]["weight_scale"] == pytest.approx(0.9 / 448) and out["fc1"]["weight_zero_point"] == 0
