"""Model coverage (issue 22): every registered tiny model family quantizes with one generic int8 config
(inputs and weights of Conv2d and Linear, conv outputs, both operands of the attention matmuls; LayerNorm,
Softmax, GELU float), exports, and builds on
ONNX Runtime and OpenVINO; each engine matches the fake-quant model (>= 30 dB SQNR on fresh random inputs) and
runs every configured layer in int8 (its placement row)."""

import pytest
import torch

import mixq
from engine_cases import sqnr_db
from mixq.speedup import ModelSpeedup
from mixq.zoo.coverage import COVERAGE_MODELS
from mixq.zoo.models import create_model

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

# One config for every family (an entry for a type a model lacks is skipped). Conv outputs are quantized too:
# ONNX Runtime runs a conv in int8 only with a quantized output (its placement note says so otherwise).
GENERIC_INT8 = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]},  # attention: Q.K^T and P.V
]
SQNR_FLOOR_DB = 30.0  # the int8 floor, engine vs fake-quant
# Layers OpenVINO 2026.4's CPU plugin keeps in float although their Q/DQ is in place (seen on an EPYC with
# avx512_vnni; the placement note says "OpenVINO kept this layer in float"): the patchify stem conv of the
# ConvNeXt block (4x4 stride 4 on the 3-channel image, output to a residual add) and the ViT's attention out_proj
# (its input is the attention's Transpose/Reshape; it depends on the static batch, and turning snippets off
# does not change it: cause not found, docs/transformers.md). Open gaps, allowed to run float here, not
# required to.
MAY_RUN_FLOAT = {
    ("convnext_block", "openvino"): {"stem"},
    ("tiny_vit", "openvino"): {f"encoder.layers.{i}.self_attn.out_proj" for i in (0, 1)},
}


@pytest.fixture(scope="module", params=sorted(COVERAGE_MODELS))
def calibrated(request):
    name = request.param
    shape = COVERAGE_MODELS[name]
    torch.manual_seed(0)
    model = create_model(name).eval()
    calib = [torch.randn(8, *shape[1:]) for _ in range(4)]
    mixq.prepare_(model, GENERIC_INT8, mixq.PTQ(), example_input=calib[0][:1])
    mixq.calibrate_(model, lambda m: [m(x) for x in calib])
    return name, model, shape


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engine_matches_fake_quant_and_runs_int8(calibrated, backend):
    name, model, shape = calibrated
    asked = set(mixq.quantized_layers(model))
    assert asked, f"{name}: the generic config quantized nothing"
    if name in ("tiny_vit", "tiny_bert"):  # attention projections (Linear) and matmuls (MatMul) the config reaches
        parts = ("in_proj", "out_proj", "qk_matmul", "pv_matmul")
        assert {f"encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in parts} <= asked
    engine = ModelSpeedup(model, shape, batchsize=shape[0], backend=backend).compress()
    torch.manual_seed(1)  # fresh inputs, not the calibration batches
    for _ in range(2):
        x = torch.randn(*shape) * 1.5
        out, _ = engine.inference(x)
        with torch.no_grad():
            ref = model(x)
        assert sqnr_db(ref, torch.as_tensor(out)) >= SQNR_FLOOR_DB, f"{name} on {backend}"
    rows = {r.layer: r for r in engine.report().rows}
    assert asked <= set(rows), f"{name}: placement lacks {sorted(asked - set(rows))}"
    allowed = MAY_RUN_FLOAT.get((name, backend), set())
    not_int8 = {layer: rows[layer].runs_as for layer in asked - allowed if rows[layer].runs_as not in ("int8", "fused")}
    assert not not_int8, f"{name} on {backend}: asked int8, runs as {not_int8}"
