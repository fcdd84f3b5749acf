"""Quantized attention matmuls (issue 22, ``op_types: ["MatMul"]``): ExplicitMultiheadAttention's two matmuls are
``mixq.attention.MatMul`` modules whose two activation operands are quantized, each on its own grid; configs,
fake-quant arithmetic, calibration files and training methods handle the second operand. Engines on them:
tests/test_model_coverage.py (ORT, OpenVINO), tests/backends/test_cuda_engine.py, test_tensorrt_check.py."""

import copy

import pytest
import torch
from torch import nn

import mixq
from mixq.primitives import fake_quantize
from mixq.quantization.model import load_calibration_

MATMULS = [{"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]}]
LINEAR = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]
NAMES = {f"layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("qk_matmul", "pv_matmul")}


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _calibrated(config, method=None):
    model = _encoder()
    torch.manual_seed(1)
    batches = [torch.randn(4, 7, 16) for _ in range(3)]
    mixq.prepare_(model, config, method or mixq.PTQ())
    mixq.calibrate_(model, lambda m: [m(x) for x in batches])
    return model


def test_matmul_operands_default_to_int8_symmetric_and_an_explicit_format_is_kept():
    specs = mixq.resolve_config(_encoder(), MATMULS)
    assert set(specs) == NAMES
    assert all(s.input.dtype.signed and s.input.symmetric and s.weight is None for s in specs.values())
    affine = [{**MATMULS[0], "quant_dtype": "uint", "quant_scheme": "per_tensor_affine"}]
    specs = mixq.resolve_config(_encoder(), affine)
    assert all(not s.input.dtype.signed and not s.input.symmetric for s in specs.values())


def test_wildcards_reach_matmuls_only_with_op_types_and_weights_on_a_matmul_are_refused():
    # configs written before MatMul was quantizable keep their meaning (and prepared models their state dicts)
    projections = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_names": ["layers.*.self_attn.*"]}]
    assert set(mixq.resolve_config(_encoder(), projections)) == {
        f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")
    }
    everything = [{"quant_types": ["input"], "quant_bits": 8, "op_names": ["*"]}]
    assert not NAMES & set(mixq.resolve_config(_encoder(), everything))
    scores = {"quant_types": ["input"], "quant_bits": 8, "op_names": ["*.qk_matmul"]}
    with pytest.raises(mixq.ConfigError, match=r"config_list\[0\]: matches no module.*'op_types': \['MatMul'\]"):
        mixq.resolve_config(_encoder(), [scores])
    assert set(mixq.resolve_config(_encoder(), [{**scores, "op_types": ["MatMul"]}])) == {
        "layers.0.self_attn.qk_matmul",
        "layers.1.self_attn.qk_matmul",
    }
    exact = [{"quant_types": ["input"], "quant_bits": 8, "op_names": ["layers.0.self_attn.pv_matmul"]}]
    assert set(mixq.resolve_config(_encoder(), exact)) == {"layers.0.self_attn.pv_matmul"}
    with pytest.raises(mixq.ConfigError, match=r"config_list\[0\].*'weight'.*qk_matmul.*has no weight"):
        mixq.resolve_config(_encoder(), [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["MatMul"]}])


def test_nni_quantizer_and_bits_config_give_a_matmul_its_operands():
    from mixq.attention import explicit_attention_
    from mixq.config import config_list_from_bits
    from mixq.nni import QAT_Quantizer

    model = _encoder()
    QAT_Quantizer(model, MATMULS, torch.optim.SGD(model.parameters(), lr=0.1))
    spec = mixq.quantized_layers(model)["layers.0.self_attn.qk_matmul"].layer_spec
    assert spec.input.dtype.signed and spec.input.symmetric  # mixq's default for matmul operands, as prepare_ gives
    bits = config_list_from_bits(explicit_attention_(_encoder()), {"layers.0.self_attn.qk_matmul": {"input_bits": 8}})
    assert bits[0]["quant_types"] == ["input"]


def test_fake_quant_matmul_multiplies_both_operands_on_their_own_grids():
    model = _calibrated(LINEAR + MATMULS)
    calibration = mixq.export_calibration(model)
    wrapper = mixq.quantized_layers(model)["layers.0.self_attn.qk_matmul"]
    seen = {}
    handle = wrapper.register_forward_hook(lambda _m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(torch.randn(2, 7, 16))
    handle.remove()
    a, b = seen["args"]
    entry = calibration["layers.0.self_attn.qk_matmul"]
    assert entry["input_scale"] != entry["input1_scale"]  # q and k^T have their own ranges
    grid = mixq.IntType(8, True)
    qa = fake_quantize(a, torch.tensor(entry["input_scale"]), torch.tensor(entry["input_zero_point"]), grid)
    qb = fake_quantize(b, torch.tensor(entry["input1_scale"]), torch.tensor(entry["input1_zero_point"]), grid)
    torch.testing.assert_close(seen["out"], torch.matmul(qa, qb))
    assert not torch.allclose(seen["out"], torch.matmul(a, b), rtol=0, atol=1e-6)  # the operands were rounded


def test_calibration_file_round_trip_and_a_missing_operand_range_is_named(tmp_path):
    calibration = mixq.export_calibration(_calibrated(MATMULS))
    path = mixq.save_calibration_config(calibration, tmp_path / "calib.json")
    assert mixq.load_calibration_config(path) == calibration
    broken = copy.deepcopy(calibration)
    del broken["layers.1.self_attn.pv_matmul"]["tracked_max_input1"]
    with pytest.raises(mixq.CalibrationFileError, match=r"layers.1.self_attn.pv_matmul.*tracked_max_input1"):
        mixq.save_calibration_config(broken, tmp_path / "broken.json")
    assert not (tmp_path / "broken.json").exists()
    no_op_type = {k: v for k, v in broken["layers.0.self_attn.qk_matmul"].items() if k != "op_type"}
    no_op_type["input1_zero_point"] = 0.0  # as a float (NNI-made dicts): read as the int
    assert (
        mixq.load_calibration_config(mixq.save_calibration_config({"m": no_op_type}, tmp_path / "n.json"))["m"][
            "input1_zero_point"
        ]
        == 0
    )
    misplaced = {"fc": {"op_type": "Linear", "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 1.0,
                        "tracked_min_input1": 0.0, "tracked_max_input1": 1.0}}  # fmt: skip
    with pytest.raises(
        mixq.CalibrationFileError, match=r"'fc'.*tracked_min_input1 belongs to a MatMul entry, not a Linear"
    ):
        mixq.save_calibration_config(misplaced, tmp_path / "misplaced.json")


@pytest.mark.parametrize("method", [mixq.QAT(), mixq.LSQ()], ids=["qat", "lsq"])
def test_training_moves_both_operand_ranges(method):
    model = _calibrated(LINEAR + MATMULS, method)
    wrapper = mixq.quantized_layers(model)["layers.0.self_attn.qk_matmul"]
    before = [q.qparams()[0].item() for q in (wrapper.input_quantizer, wrapper.input1_quantizer)]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    target = torch.randn(4, 7, 16)  # the post-norm output's mean square is ~1 whatever the ranges: fit a target
    for _ in range(3):
        optimizer.zero_grad()
        (model(torch.randn(4, 7, 16) * 3) - target).square().mean().backward()
        optimizer.step()
    after = [q.qparams()[0].item() for q in (wrapper.input_quantizer, wrapper.input1_quantizer)]
    assert after[0] != before[0] and after[1] != before[1], (before, after)


def test_loading_a_calibration_config_sets_both_operand_ranges():
    calibration = mixq.export_calibration(_calibrated(MATMULS))
    fresh = _encoder()
    mixq.prepare_(fresh, MATMULS, mixq.QAT())
    assert load_calibration_(fresh, calibration) == []  # NNI's quantizer.load_calibration_config
    mixq.freeze_(fresh)
    assert mixq.export_calibration(fresh) == calibration


def test_export_names_a_matmul_entry_without_its_second_operand():
    from mixq.export import export_qdq_onnx

    model = _calibrated(MATMULS)
    calibration = mixq.export_calibration(model)
    entry = calibration["layers.0.self_attn.qk_matmul"]
    del entry["op_type"]  # optional in calibration files: the file check cannot know it is a MatMul
    for k in ("tracked_min_input1", "tracked_max_input1", "input1_scale", "input1_zero_point"):
        del entry[k]
    with pytest.raises(mixq.CalibrationFileError, match=r"'layers.0.self_attn.qk_matmul'.*lacks the second's range"):
        export_qdq_onnx(mixq.deploy_model(model), (2, 7, 16), calibration)


def test_benchmark_encoder_layers_have_their_own_weights():
    from mixq.zoo.coverage import BertBaseEncoder

    torch.manual_seed(0)
    first, second = BertBaseEncoder(2).encoder.layers
    for name, weight in first.state_dict().items():
        if name.endswith("weight") and "norm" not in name:
            assert not torch.equal(weight, second.state_dict()[name]), name
