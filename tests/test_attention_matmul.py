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


def test_wildcards_that_quantize_weights_skip_the_matmuls_and_weights_on_a_matmul_are_refused():
    projections = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_names": ["layers.*.self_attn.*"]}]
    assert set(mixq.resolve_config(_encoder(), projections)) == {
        f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")
    }
    scores_only = [{"quant_types": ["input"], "quant_bits": 8, "op_names": ["*.qk_matmul"]}]
    assert set(mixq.resolve_config(_encoder(), scores_only)) == {
        "layers.0.self_attn.qk_matmul",
        "layers.1.self_attn.qk_matmul",
    }
    with pytest.raises(mixq.ConfigError, match=r"config_list\[0\].*'weight'.*qk_matmul.*has no weight"):
        mixq.resolve_config(_encoder(), [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["MatMul"]}])


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
    misplaced = {"fc": {"op_type": "Linear", "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 1.0,
                        "tracked_min_input1": 0.0, "tracked_max_input1": 1.0}}  # fmt: skip
    with pytest.raises(mixq.CalibrationFileError, match=r"'fc'.*tracked_min_input1 belongs to a MatMul entry"):
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
