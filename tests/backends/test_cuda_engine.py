"""The cuda backend end to end on the CPU: the lowering of real Q/DQ exports (what each layer becomes) and
the whole engine, through Triton's interpreter, against the fake-quant model. The same tests run natively
on a GPU; tests/gpu/test_cuda_engine.py adds real CIFAR-10 images, CUDA graphs and the large models."""

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

import mixq
from engine_cases import ALL8_WITH_LOGITS, TUTORIAL_STYLE, sqnr_db
from mixq.backends import BuildOptions, EngineError, load_engine, read_engine_file
from mixq.backends.cuda_lower import QConv, lower
from mixq.export import export_qdq_onnx
from mixq.speedup import all_int8_config
from mixq.zoo.models import create_model

CONV_OUT = [  # conv outputs quantized too: the engine fake-quantizes them inside the epilogue
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def ptq_export(name: str, config, shape, seed: int = 0):
    """A registered model with BatchNorm statistics that are not the identity, PTQ-calibrated, and its export."""
    torch.manual_seed(seed)
    model = create_model(name).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(64, *shape[1:])
    mixq.prepare_(model, config, mixq.PTQ(), example_input=x[:1])
    mixq.calibrate_(model, lambda m: m(x))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, *shape[1:]), mixq.export_calibration(model))
    return model, qdq


def test_lowering_fuses_every_resnet_layer_into_int8_kernels():
    """All-8-bit ResNet: one int8 kernel per conv (the shortcut conv as the second GEMM of its block's
    conv2, the residual add and ReLU in the epilogue), the average pool on int8, the classifier int8."""
    _, qdq = ptq_export("tiny_resnet", all_int8_config(create_model("tiny_resnet")), (1, 3, 16, 16))
    plan = lower(qdq.model, qdq.layers)
    kinds = [op.kind for op in plan.ops]
    assert kinds == ["conv", "conv", "conv", "conv", "conv", "pool", "conv"], kinds
    convs = [op for op in plan.ops if isinstance(op, QConv)]
    assert all(op.mode == "int8" for op in convs)
    assert convs[0].x_float  # the network input is quantized as the first conv loads it
    block1, block2 = convs[2], convs[4]
    assert block1.res is not None and block1.res[1] is not None and block1.act is not None  # int8 residual
    assert block2.sc is not None and block2.res is None  # the shortcut conv runs inside conv2
    assert all(op.out_grid is not None for op in convs[:-1]) and convs[-1].out_grid is None  # logits float


def test_lowering_with_quantized_conv_outputs_reopens_them():
    """Conv -> Q -> DQ -> Add/ReLU -> Q: the conv output's grid becomes the epilogue's fake-quant stage."""
    _, qdq = ptq_export("tiny_resnet", CONV_OUT, (1, 3, 16, 16))
    convs = [op for op in lower(qdq.model, qdq.layers).ops if isinstance(op, QConv)]
    assert all(op.q0 is not None for op in convs if op.act is not None)
    assert any(op.res is not None and op.q0 is not None for op in convs)


def test_unsupported_op_names_the_node():
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Erf", ["input"], ["output"], name="/act/Erf")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    with pytest.raises(EngineError, match=r"node '/act/Erf': ONNX op Erf is not supported by the cuda backend"):
        lower(model, {})


# ------------------------------------------------------------------ the engine itself (needs triton)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install 'mixq[cuda]'): the cuda engine is not run here",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def build():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'mixq[cuda]')")
    if DEVICE == "cpu":
        if "mixq.backends.cuda_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the kernels were compiled for a GPU before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    from mixq.backends.cuda import build_engine

    return lambda qdq, shape: build_engine(qdq, shape, BuildOptions(opt_batch=shape[0]), DEVICE)


def _steps(out: torch.Tensor, ref: torch.Tensor, scale: float) -> torch.Tensor:
    centred = (out - out.mean(1, keepdim=True)) - (ref - ref.mean(1, keepdim=True))
    return centred.abs() / scale


@needs_triton
@pytest.mark.parametrize("config", ["all8_with_logits", "tutorial"])
def test_lenet_engine_matches_the_fake_quant_model(build, config):
    cfg = ALL8_WITH_LOGITS if config == "all8_with_logits" else TUTORIAL_STYLE
    model, qdq = ptq_export("lenet", cfg, (1, 1, 28, 28))
    engine = build(qdq, (8, 1, 28, 28))
    x = torch.randn(8, 1, 28, 28) * 1.5  # fresh inputs, not the calibration batch
    out = engine.run(x)
    with torch.no_grad():
        ref = model(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    if config == "all8_with_logits":
        scale = float(model.fc3.output_quantizer.qparams()[0])
        steps = _steps(out, ref, scale)
        # The kernels compute the same integers; a value within a float ulp of a rounding tie may land one
        # step away and move a logit by about a step.
        assert float(steps.quantile(0.99)) <= 0.5 and float(steps.max()) <= 2.0, steps.max()
    else:
        assert sqnr_db(ref, out) > 35, sqnr_db(ref, out)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.875
    rows = {r.layer: r for r in engine.placement()}
    assert rows["conv1"].runs_as == rows["conv2"].runs_as == rows["fc1"].runs_as == "int8"
    assert rows["relu1"].runs_as == "fused" and "conv1" in rows["relu1"].note


@needs_triton
@pytest.mark.parametrize("config", ["all8", "conv_out"])
def test_resnet_engine_matches_the_fake_quant_model(build, config):
    cfg = all_int8_config(create_model("tiny_resnet")) if config == "all8" else CONV_OUT
    model, qdq = ptq_export("tiny_resnet", cfg, (1, 3, 16, 16))
    engine = build(qdq, (4, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    out = engine.run(x)
    with torch.no_grad():
        ref = model(x)
    assert sqnr_db(ref, out) > 30, sqnr_db(ref, out)
    rows = [r for r in engine.placement() if r.op_type in ("Conv2d", "Linear")]
    expected = {"Conv2d": "int8", "Linear": "int8" if config == "all8" else "fp32"}
    assert all(r.runs_as in (expected[r.op_type], "fused") for r in rows), [(r.layer, r.runs_as) for r in rows]


@needs_triton
def test_engine_file_round_trip_keeps_kernels_and_outputs(build, tmp_path):
    _, qdq = ptq_export("lenet", ALL8_WITH_LOGITS, (1, 1, 28, 28))
    engine = build(qdq, (4, 1, 28, 28))
    path = engine.save(tmp_path / "lenet.mixq")
    manifest, members = read_engine_file(path, "cuda")
    assert manifest["backend"] == "cuda" and set(members) == {"model.onnx", "kernels.json"}
    from mixq.backends.cuda import CudaBackend

    loaded = CudaBackend().load(path, device=DEVICE)
    x = torch.randn(4, 1, 28, 28)
    np.testing.assert_array_equal(engine.run(x).numpy(), loaded.run(x).numpy())
    assert [r.kernels for r in loaded.placement()] == [r.kernels for r in engine.placement()]
    if DEVICE == "cpu":
        with pytest.raises(EngineError, match="needs a CUDA GPU"):
            load_engine(path)  # the registry's loader refuses without a GPU, with the reason


@needs_triton
def test_fp16_engine_runs_every_layer_in_fp16(build):
    torch.manual_seed(0)
    model = create_model("lenet").eval()
    qdq = export_qdq_onnx(model, (1, 1, 28, 28), {}, extra_layer_bits=16)
    engine = build(qdq, (4, 1, 28, 28))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    out = engine.run(x)
    assert sqnr_db(ref, out) > 40, sqnr_db(ref, out)  # fp16 operands, fp32 accumulation
    runs = {r.layer: r.runs_as for r in engine.placement() if r.op_type in ("Conv2d", "Linear")}
    assert set(runs.values()) == {"fp16"}, runs


@needs_triton
def test_profile_gives_every_layer_a_time(build):
    _, qdq = ptq_export("lenet", ALL8_WITH_LOGITS, (1, 1, 28, 28))
    engine = build(qdq, (2, 1, 28, 28))
    times = {t.layer: t.microseconds for t in engine.profile(torch.randn(2, 1, 28, 28), runs=2)}
    assert {"conv1", "conv2", "fc1", "fc2", "fc3", "pool1", "pool2"} <= set(times)
    assert all(v > 0 for v in times.values())
