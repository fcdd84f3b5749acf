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
from engine_cases import ALL8_WITH_LOGITS, TUTORIAL_STYLE, randomize_batchnorm, sqnr_db
from mixq.backends import BuildOptions, EngineError, load_engine, read_engine_file
from mixq.backends.cuda.lower import QConv, lower
from mixq.export import export_qdq_onnx
from mixq.spec import FP8_E4M3
from mixq.speedup import all_fp8_config, all_int8_config
from mixq.zoo.models import create_model

CONV_OUT = [  # conv outputs quantized too: the engine fake-quantizes them inside the epilogue
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def ptq_export(name: str, config, shape, seed: int = 0):
    """A registered model with BatchNorm statistics that are not the identity, PTQ-calibrated, and its export."""
    torch.manual_seed(seed)
    model = create_model(name).eval()
    randomize_batchnorm(model)
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

    node = helper.make_node("Round", ["input"], ["output"], name="/act/Round")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    with pytest.raises(EngineError, match=r"node '/act/Round': ONNX op Round is not supported by the cuda backend"):
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
        if "mixq.backends.cuda.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the kernels were compiled for a GPU before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    from mixq.backends.cuda.engine import build_engine

    def make(qdq, shape, **options):
        return build_engine(qdq, shape, BuildOptions(opt_batch=shape[0], **options), DEVICE)

    if DEVICE != "cpu":
        yield make
        return
    # the interpreter's e4m3 conversion is wrong (see test_cuda_kernels.py): torch's, for these engines' runs
    from triton.runtime import interpreter

    from backends.test_cuda_kernels import _torch_convert_float

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_convert_float", _torch_convert_float(interpreter._convert_float))
        yield make


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
    from mixq.backends.cuda.engine import CudaBackend

    loaded = CudaBackend(DEVICE).load(path)
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


# ------------------------------------------------------------------ fp8 (e4m3) graphs in the contract's ONNX form
#
# Built with onnx.helper as the fp8 contract writes them (opset 19; activations QuantizeLinear/DequantizeLinear
# with FLOAT8E4M3FN zero points; weights FLOAT8E4M3FN initializers quantized as fake_quantize_fp8 through a
# per-channel DequantizeLinear, axis 0; float biases), or int8 / float layers in between. ONNX Runtime runs the
# same graph literally as the reference.


def _fp8_graph(kinds: dict, seed: int = 0):
    """A small residual network: stem conv -> ReLU -> Q/DQ; block 1 (conv1 -> ReLU -> Q/DQ -> conv2 + input ->
    ReLU -> Q/DQ); block 2 (stride-2 conv1 -> ReLU -> Q/DQ -> conv2 + 1x1 stride-2 shortcut conv -> ReLU ->
    Q/DQ); max pool; global average pool; Flatten; Gemm. ``kinds``: layer -> "fp8" | "int8" | "fp32" (its weight
    and the activation Q/DQ it owns). Returns (onnx model, layers metadata)."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(seed)
    nodes, inits, layers = [], [], {}

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def act_qdq(x, layer, amax):
        """Q/DQ of ``x`` owned by ``layer`` (a conv's input, a ReLU's output), symmetric over +-amax."""
        kind = kinds[layer]
        if kind == "fp32":
            return x
        zp = np.zeros((), ml_dtypes.float8_e4m3fn) if kind == "fp8" else np.zeros((), np.int8)
        y = f"{x}.{layer}"
        s, z = const(f"{y}.s", np.float32(amax / (FP8_E4M3.max if kind == "fp8" else 127))), const(f"{y}.zp", zp)
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [y + ".q"], name=f"/{layer}/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [y + ".q", s, z], [y + ".dq"],
                                      name=f"/{layer}/DequantizeLinear"))  # fmt: skip
        return y + ".dq"

    def weight(layer, w):
        kind = kinds[layer]
        if kind == "fp32":
            return const(f"{layer}.w", w.numpy())
        amax = w.reshape(w.shape[0], -1).abs().amax(1).double()
        if kind == "fp8":
            scale = amax / FP8_E4M3.max
            q = (w.double() / scale.reshape(-1, *[1] * (w.dim() - 1))).clamp(-FP8_E4M3.max, FP8_E4M3.max).float()
            q = q.to(torch.float8_e4m3fn).float().numpy().astype(ml_dtypes.float8_e4m3fn)
            zp = np.zeros(w.shape[0], ml_dtypes.float8_e4m3fn)
        else:
            scale = amax / 127
            q = torch.round(w.double() / scale.reshape(-1, *[1] * (w.dim() - 1))).clamp(-127, 127)
            q, zp = q.numpy().astype(np.int8), np.zeros(w.shape[0], np.int8)
        args = [const(f"{layer}.wq", q), const(f"{layer}.ws", scale.float().numpy()), const(f"{layer}.wzp", zp)]
        nodes.append(helper.make_node("DequantizeLinear", args, [f"{layer}.w"], name=f"/{layer}/DequantizeLinear_w",
                                      axis=0))  # fmt: skip
        return f"{layer}.w"

    def conv(layer, x, cin, cout, k, stride, amax):
        layers[layer] = {"op_type": "Conv2d", "precision": kinds[layer]}
        x = act_qdq(x, layer, amax)
        w = weight(layer, torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5)
        b = const(f"{layer}.b", (torch.randn(cout, generator=gen) * 0.1).numpy())
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{layer}.out"], name=f"/{layer}/Conv",
                                      kernel_shape=[k, k], strides=[stride] * 2, pads=[k // 2] * 4))  # fmt: skip
        return f"{layer}.out"

    def relu(layer, x, amax):
        layers[layer] = {"op_type": "ReLU", "precision": kinds[layer]}
        nodes.append(helper.make_node("Relu", [x], [f"{layer}.out"], name=f"/{layer}/Relu"))
        return act_qdq(f"{layer}.out", layer, amax)

    h = relu("stem_relu", conv("stem", "input", 3, 16, 3, 1, 3.0), 6.0)
    a = relu("b1_relu1", conv("b1_conv1", h, 16, 16, 3, 1, 6.0), 6.0)
    nodes.append(helper.make_node("Add", [conv("b1_conv2", a, 16, 16, 3, 1, 6.0), h], ["b1.sum"], name="/b1_add/Add"))
    h = relu("b1_relu2", "b1.sum", 8.0)
    a = relu("b2_relu1", conv("b2_conv1", h, 16, 24, 3, 2, 8.0), 6.0)
    sc = conv("b2_shortcut", h, 16, 24, 1, 2, 8.0)
    nodes.append(helper.make_node("Add", [conv("b2_conv2", a, 24, 24, 3, 1, 6.0), sc], ["b2.sum"], name="/b2_add/Add"))
    h = relu("b2_relu2", "b2.sum", 8.0)
    nodes.append(helper.make_node("MaxPool", [h], ["pool.out"], name="/pool/MaxPool", kernel_shape=[2, 2],
                                  strides=[2, 2]))  # fmt: skip
    nodes.append(helper.make_node("GlobalAveragePool", ["pool.out"], ["gap.out"], name="/gap/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["gap.out"], ["flat"], name="/flatten/Flatten"))
    layers["fc"] = {"op_type": "Linear", "precision": kinds["fc"]}
    fc_x = act_qdq("flat", "fc", 4.0)
    w = weight("fc", torch.randn(10, 24, generator=gen) * 0.3)
    b = const("fc.b", (torch.randn(10, generator=gen) * 0.1).numpy())
    nodes.append(helper.make_node("Gemm", [fc_x, w, b], ["logits"], name="/fc/Gemm", transB=1))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])]
    graph = helper.make_graph(nodes, "fp8net", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    return model, layers


FP8_LAYERS = ["stem", "stem_relu", "b1_conv1", "b1_relu1", "b1_conv2", "b1_relu2", "b2_conv1", "b2_relu1",
              "b2_shortcut", "b2_conv2", "b2_relu2", "fc"]  # fmt: skip


def _ort(model, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph literally
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


class _QDQ:  # what build_engine reads of an export
    def __init__(self, model, layers):
        self.model, self.layers = model, layers


def test_lowering_runs_an_all_fp8_network_in_fp8_kernels():
    """Every conv and the linear layer fp8 (A read straight from e4m3 NHWC tensors), the stem quantizing the
    float input on load, the residual (e4m3) and the shortcut conv (second e4m3 GEMM) fused, ReLU + Q into the
    epilogues, the max pool on e4m3, the average pool's output quantized for the linear layer."""
    model, layers = _fp8_graph(dict.fromkeys(FP8_LAYERS, "fp8"))
    plan = lower(model, layers)
    convs = [op for op in plan.ops if isinstance(op, QConv)]
    assert [op.kind for op in plan.ops] == ["conv", "conv", "conv", "conv", "conv", "pool", "pool", "conv"], plan.ops
    assert all(op.mode == "fp8" for op in convs) and convs[0].x_float
    assert convs[2].res is not None and convs[2].res[1].dtype == "fp8" and convs[2].act is not None
    assert convs[4].sc is not None and convs[4].sc.grid.dtype == "fp8"
    assert all(op.out_grid.dtype == "fp8" for op in convs[:-1]) and convs[-1].out_grid is None
    assert {plan.tensors[op.x].dtype for op in convs[1:]} == {"fp8"}
    pools = [op for op in plan.ops if op.kind == "pool"]
    assert pools[0].is_max and pools[0].grid.dtype == "fp8" and pools[1].out_grid.dtype == "fp8"
    assert plan.notes == {}


def test_lowering_of_a_mixed_int8_fp8_fp32_network():
    kinds = dict.fromkeys(FP8_LAYERS, "fp8") | {"stem": "int8", "stem_relu": "int8", "b2_conv1": "fp32",
                                                "b2_relu1": "fp32", "fc": "int8"}  # fmt: skip
    model, layers = _fp8_graph(kinds)
    plan = lower(model, layers)
    modes = {op.node.split("/")[1]: op.mode for op in plan.ops if isinstance(op, QConv)}
    assert modes["stem"] == "int8" and modes["b1_conv1"] == "fp8" and modes["fc"] == "int8"
    assert modes["b2_conv1"] == "fp32"  # float weights after an fp8 input: dequantized on load
    assert any(op.kind == "requant" and op.grid.dtype != op.out_grid.dtype for op in plan.ops) or any(
        isinstance(op, QConv) and op.out2_grid is not None and op.out2_grid.dtype != op.out_grid.dtype
        for op in plan.ops
    )


@needs_triton
def test_fp8_layer_that_cannot_run_fp8_says_why(build):
    """A layer asking fp8 whose weight is float (no FLOAT8E4M3FN DequantizeLinear) runs fp32 and the placement
    note names the reason; so does one whose input comes from an int8 grid."""
    kinds = dict.fromkeys(FP8_LAYERS, "fp8") | {"b2_conv1": "fp32", "b1_conv1": "int8"}
    model, layers = _fp8_graph(kinds)
    layers["b2_conv1"]["precision"] = "fp8"  # the layer asks fp8, its weight is a float initializer
    plan = lower(model, layers)
    assert set(plan.notes) == {"b2_conv1"} and "float initializer" in plan.notes["b2_conv1"]
    rows = {r.layer: r for r in build(_QDQ(model, layers), (2, 3, 8, 8)).placement()}
    assert rows["b2_conv1"].runs_as == "fp32"
    assert rows["b2_conv1"].note.startswith("asked fp8, runs fp32: its weight is a float initializer")
    assert rows["b1_conv1"].runs_as == "int8" and rows["b1_conv2"].runs_as == "fp8"


@needs_triton
@pytest.mark.parametrize("mix", ["all_fp8", "mixed"])
def test_fp8_engine_matches_onnx_runtime_on_the_same_graph(build, mix):
    kinds = dict.fromkeys(FP8_LAYERS, "fp8")
    if mix == "mixed":
        kinds |= {"stem": "int8", "stem_relu": "int8", "b2_conv1": "fp32", "b2_relu1": "fp32", "fc": "int8"}
    model, layers = _fp8_graph(kinds, seed=1)
    engine = build(_QDQ(model, layers), (6, 3, 8, 8))
    x = torch.randn(6, 3, 8, 8) * 1.5  # fresh inputs
    out, ref = engine.run(x), _ort(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # same math; an activation within a float rounding of an e4m3 tie may land one e4m3 step away (~6-12%
    # of that element) and move a logit a little
    assert sqnr_db(ref, out) > 30, sqnr_db(ref, out)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 5 / 6
    rows = {r.layer: r for r in engine.placement()}
    for layer, kind in kinds.items():
        if layers[layer]["op_type"] in ("Conv2d", "Linear"):
            assert rows[layer].runs_as in (kind, "fused"), (layer, rows[layer])
    assert "fp8 tensor cores" in " ".join(rows["b1_conv1"].kernels)
    assert rows["b2_shortcut"].runs_as == "fused" and "b2_conv2" in rows["b2_shortcut"].note
    for row in rows.values():  # fp8 layers (only they) say how they accumulate
        assert ("fp8 tensor cores" in row.note) == (row.runs_as == "fp8"), row
    if mix == "all_fp8":
        from mixq.backends.cuda.engine import FP8_ACC32_NOTE  # (imported once the build fixture chose the mode)

        assert "about 11 bits" in FP8_ACC32_NOTE  # fp32 accumulation by default (MIXQ_CUDA_FP8_ACC unset)
        assert all(r.note == FP8_ACC32_NOTE for r in rows.values() if r.runs_as == "fp8")
        assert all("/acc32" in " ".join(r.kernels) for r in rows.values() if r.runs_as == "fp8")


def test_lowering_of_an_fp8_export_runs_every_layer_in_fp8_kernels():
    """The exporter's all-fp8 ResNet (mixq.speedup.all_fp8_config): the int8 plan's shape, every op on e4m3."""
    _, qdq = ptq_export("tiny_resnet", all_fp8_config(create_model("tiny_resnet")), (1, 3, 16, 16))
    plan = lower(qdq.model, qdq.layers)
    assert [op.kind for op in plan.ops] == ["conv", "conv", "conv", "conv", "conv", "pool", "conv"]
    convs = [op for op in plan.ops if isinstance(op, QConv)]
    assert all(op.mode == "fp8" for op in convs) and convs[0].x_float
    assert convs[2].res is not None and convs[2].res[1].dtype == "fp8"
    assert convs[4].sc is not None and convs[4].sc.grid.dtype == "fp8"
    assert all(plan.tensors[t].dtype == "fp8" for t in plan.tensors if t not in (0, plan.output))
    assert plan.notes == {}


@needs_triton
@pytest.mark.parametrize(("name", "shape"), [("lenet", (4, 1, 28, 28)), ("tiny_resnet", (4, 3, 16, 16))])
def test_fp8_export_engine_matches_the_fake_quant_model(build, name, shape):
    model, qdq = ptq_export(name, all_fp8_config(create_model(name)), (1, *shape[1:]))
    engine = build(qdq, shape)
    x = torch.randn(*shape) * 1.5  # fresh inputs, not the calibration batch
    out = engine.run(x)
    with torch.no_grad():
        ref = model(x)
    # the same e4m3 math; a value within a float rounding of an e4m3 tie (or, on the GPU, within the fp8
    # wgmma's accumulation error of one) may land one step (6-12%) away and move the logits a little
    assert sqnr_db(ref, out) > 30, sqnr_db(ref, out)
    rows = [r for r in engine.placement() if r.op_type in ("Conv2d", "Linear")]
    assert all(r.runs_as in ("fp8", "fused") for r in rows) and any(r.runs_as == "fp8" for r in rows), rows
    assert all("fp8 tensor cores" in " ".join(r.kernels) for r in rows if r.runs_as == "fp8")
    assert all("fp32 accumulator" in r.note for r in rows if r.runs_as == "fp8")  # the default: acc32


@needs_triton
def test_fp8_reduced_accumulation_is_an_explicit_choice(build, monkeypatch):
    """MIXQ_CUDA_FP8_ACC=reduced builds the tensor cores' own accumulation, and the placement report says so."""
    monkeypatch.setenv("MIXQ_CUDA_FP8_ACC", "reduced")
    model, qdq = ptq_export("lenet", all_fp8_config(create_model("lenet")), (1, 1, 28, 28))
    engine = build(qdq, (4, 1, 28, 28))
    rows = [r for r in engine.placement() if r.runs_as == "fp8"]
    assert rows and all("accumulate with reduced precision" in r.note for r in rows)
    assert not any("/acc32" in " ".join(r.kernels) for r in rows)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert sqnr_db(model(x), engine.run(x)) > 30


def test_fp8_layers_on_a_gpu_without_e4m3_tensor_cores_fail_with_one_line(monkeypatch):
    """The engine's check (base.check_fp8_support, shared with TensorRT) on the lowered plan's first fp8 node,
    with a faked capability: no GPU needed."""
    from mixq.backends.base import FP8_CAPABILITY, check_fp8_support

    model, layers = _fp8_graph(dict.fromkeys(FP8_LAYERS, "fp8"))
    plan = lower(model, layers)
    first = next(op.node for op in plan.ops if getattr(op, "mode", None) == "fp8")
    assert FP8_CAPABILITY == (8, 9) and first == "/stem/Conv"
    with pytest.raises(EngineError, match=r"node '/stem/Conv' runs fp8 \(e4m3\).*capability 8.9.*this one is 8.0"):
        check_fp8_support(f"node {first!r}", torch.device("cuda"), capability=(8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # read when not given
    with pytest.raises(EngineError, match=r"this one is 8.6"):
        check_fp8_support(f"node {first!r}", torch.device("cuda"))
    check_fp8_support(f"node {first!r}", torch.device("cuda"), capability=(8, 9))  # Ada: fine
    check_fp8_support(f"node {first!r}", torch.device("cuda"), capability=(9, 0))  # Hopper: fine
    check_fp8_support(None, torch.device("cuda"), capability=(7, 5))  # no fp8 layer: nothing to check
    check_fp8_support(f"node {first!r}", torch.device("cpu"), capability=(7, 5))  # the interpreter emulates e4m3


# ------------------------------------------------------------------ transformers (issue 22)

LINEAR_INT8 = [  # the coverage suite's generic config: inputs and weights of every Linear, conv outputs too
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
]
LINEAR_FP8 = [{**entry, "quant_dtype": "fp8"} for entry in LINEAR_INT8]


def _transformer_export(name: str, config):
    from mixq.zoo.coverage import COVERAGE_MODELS

    shape = COVERAGE_MODELS[name]
    torch.manual_seed(0)
    model = create_model(name).eval()
    calib = [torch.randn(8, *shape[1:]) for _ in range(4)]
    mixq.prepare_(model, config, mixq.PTQ(), example_input=calib[0][:1])
    mixq.calibrate_(model, lambda m: [m(x) for x in calib])
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, *shape[1:]), mixq.export_calibration(model))
    return model, qdq, shape


def test_lowering_runs_every_transformer_linear_as_a_token_gemm():
    """ViT: the patch conv and every attention/MLP Linear on tokens are int8 kernels (their bias Adds fused),
    the class token's Expand follows the batch, shape arithmetic is folded (no Shape op runs), GELU and the
    attention core are one op each."""
    _, qdq, _ = _transformer_export("tiny_vit", LINEAR_INT8)
    plan = lower(qdq.model, qdq.layers)
    convs = [op for op in plan.ops if isinstance(op, QConv)]
    assert len(convs) == 10 and all(op.mode == "int8" for op in convs), [(op.node, op.mode) for op in convs]
    tokens = [op for op in plan.ops if isinstance(op, QConv) and op.geometry.get("tokens")]
    assert len(tokens) == 8  # 2 layers x (in_proj, out_proj, linear1, linear2)
    assert all(any(n.endswith("/Add") for n in op.absorbed) for op in tokens)  # the Linear's bias Add
    torch_ops = [op.op for op in plan.ops if op.kind == "torch"]
    assert "ExpandBatch" in torch_ops and not {"Shape", "ConstantOfShape", "Equal", "Where"} & set(torch_ops)
    # GELU and attention run as one torch call each (.patterns), per layer
    assert torch_ops.count("Gelu") == torch_ops.count("ScaledDotProductAttention") == 2
    assert not {"Erf", "Softmax", "MatMul"} & set(torch_ops)


def test_reshape_that_folds_the_batch_into_another_dimension_names_the_node():
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_node("Shape", ["input"], ["s"], name="/Shape")
    batch = helper.make_node("Gather", ["s", "zero"], ["b"], name="/Gather", axis=0)
    merged = helper.make_node("Mul", ["b", "two"], ["b2"], name="/Mul")
    target = helper.make_node("Concat", ["b2_1", "minus1"], ["t"], name="/Concat", axis=0)
    unsq = helper.make_node("Unsqueeze", ["b2", "axes"], ["b2_1"], name="/Unsqueeze")
    reshape = helper.make_node("Reshape", ["input", "t"], ["output"], name="/heads/Reshape")
    inits = [
        helper.make_tensor(name, TensorProto.INT64, dims, values)
        for name, dims, values in (("zero", [], [0]), ("two", [], [2]), ("minus1", [1], [-1]), ("axes", [1], [0]))
    ]
    graph = helper.make_graph(
        [shape, batch, merged, unsq, target, reshape], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 12])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    with pytest.raises(EngineError, match=r"node '/heads/Reshape' \(Reshape\).*leading dimension"):
        lower(model, {})


@needs_triton
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_bert"])
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_transformer_engine_matches_the_fake_quant_model(build, name, precision):
    """Every Linear (attention projections, MLP, heads) runs in the asked 8-bit format, at a batch other than
    the build's, within the issue's 30 dB of the fake-quant model (the int8 kernels compute the same integers)."""
    model, qdq, shape = _transformer_export(name, LINEAR_INT8 if precision == "int8" else LINEAR_FP8)
    engine = build(qdq, shape)
    torch.manual_seed(1)  # fresh inputs, not the calibration batches
    for batch in (shape[0], 3):
        x = torch.randn(batch, *shape[1:]) * 1.5
        out = engine.run(x)
        with torch.no_grad():
            ref = model(x)
        assert out.shape == ref.shape
        assert sqnr_db(ref, out) >= 30.0, (batch, sqnr_db(ref, out))
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.875
    rows = {r.layer: r for r in engine.placement()}
    asked = set(mixq.quantized_layers(model))
    assert asked <= set(rows)
    assert {layer: rows[layer].runs_as for layer in asked} == dict.fromkeys(asked, precision)


def test_fp16_glue_lowers_only_the_ops_no_layer_covers_to_fp16():
    """``glue="fp16"``: LayerNorm, GELU, attention and the residual adds run in fp16, the int8 token GEMMs write
    fp16 floats, the layers stay int8, the network output is cast back to fp32; an unknown value is one line."""
    _, qdq, _ = _transformer_export("tiny_vit", LINEAR_INT8)
    fp32, fp16 = lower(qdq.model, qdq.layers), lower(qdq.model, qdq.layers, glue="fp16")
    glue = {"LayerNormalization", "Gelu", "ScaledDotProductAttention", "Add"}
    for plan, dtype in ((fp32, "fp32"), (fp16, "fp16")):
        ops = [op for op in plan.ops if op.kind == "torch" and op.op in glue]
        assert {op.op for op in ops} == glue and {op.dtype for op in ops} == {dtype}
        convs = [op for op in plan.ops if isinstance(op, QConv)]
        assert {op.mode for op in convs} == {"int8"}
        assert {op.out_dtype for op in convs if op.out_grid is None} == {dtype}
        assert plan.tensors[plan.output].dtype == "fp32"
    with pytest.raises(EngineError, match=r"float glue precision 'bf16': expected one of fp32, fp16"):
        lower(qdq.model, qdq.layers, glue="bf16")


@needs_triton
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_bert"])
def test_fp16_glue_engine_matches_the_fake_quant_model(build, name, tmp_path):
    """The fp16 glue only rounds what the fp32 glue computes: within the same 30 dB of the fake-quant model,
    every Linear still int8, and an engine file keeps the choice."""
    model, qdq, shape = _transformer_export(name, LINEAR_INT8)
    engine = build(qdq, shape, float_glue="fp16")
    described = {r.describe() for r in engine.runners if r.op.kind == "torch"}
    assert "torch LayerNormalization fp16" in described and "torch LayerNormalization fp32" not in described
    torch.manual_seed(1)
    x = torch.randn(3, *shape[1:]) * 1.5
    out = engine.run(x)
    with torch.no_grad():
        ref = model(x)
    assert out.dtype == torch.float32 and sqnr_db(ref, out) >= 30.0, sqnr_db(ref, out)
    rows = {r.layer: r for r in engine.placement()}
    assert {layer: rows[layer].runs_as for layer in mixq.quantized_layers(model)} == dict.fromkeys(
        mixq.quantized_layers(model), "int8"
    )
    from mixq.backends.cuda.engine import CudaBackend

    loaded = CudaBackend(DEVICE).load(engine.save(tmp_path / f"{name}.mixq"))
    assert loaded.float_glue == "fp16"
    np.testing.assert_array_equal(engine.run(x).numpy(), loaded.run(x).numpy())


@needs_triton
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_bert"])
def test_library_fp8_gemm_computes_what_the_triton_kernel_does(build, name, tmp_path):
    """The cuBLASLt candidate (torch._scaled_mm) of the fp8 token GEMMs, on each layer's real input: the Triton
    kernel's result up to bf16 rounding of its output (relative error <= 2**-9 per element, so >= 54.2 dB); the
    placement names it, and an engine file keeps the choice (the tuner makes it on a GPU, and only for an
    fp16-glue build; here every layer that fits is switched by hand)."""
    from mixq.backends.cuda.engine import FP8_LIBRARY_NOTE, CudaBackend
    from mixq.backends.cuda.library_gemm import LibraryGemm, library_gemm_fits

    _, qdq, shape = _transformer_export(name, LINEAR_FP8)
    engine = build(qdq, shape, float_glue="fp16")
    fits = [i for i, r in enumerate(engine.runners) if r.op.kind == "conv" and library_gemm_fits(r.op)]
    encoder = [i for i in fits if "layers." in engine.runners[i].op.node]
    assert len(encoder) == 8  # 2 layers x (in_proj, out_proj, linear1, linear2)
    assert all(engine.runners[i].op.geometry["cout"] % 16 == 0 for i in fits)  # not the 10-class heads
    torch.manual_seed(1)
    env = {0: torch.randn(3, *shape[1:]) * 1.5}
    bf16_bound = 20 * np.log10(2.0**9)
    for i, runner in enumerate(engine.runners):
        if i in fits:
            library = engine._gemm_runner(runner.op, LibraryGemm())
            mine = dict(env)
            library(mine)
        engine._step(runner, env)
        if i in fits:
            ref, out = env[runner.op.out].float(), mine[runner.op.out].float()
            assert out.shape == ref.shape and sqnr_db(ref, out) >= bf16_bound, (runner.op.node, sqnr_db(ref, out))
            engine.runners[i] = library
    switched = {engine._op_layer(engine.runners[i].op) for i in fits}
    rows = {r.layer: r for r in engine.placement()}
    assert all(rows[layer].runs_as == "fp8" and rows[layer].note == FP8_LIBRARY_NOTE for layer in switched)
    assert all(any(k.startswith("cuBLASLt fp8 GEMM") for k in rows[layer].kernels) for layer in switched)
    x = torch.randn(2, *shape[1:])
    loaded = CudaBackend(DEVICE).load(engine.save(tmp_path / f"{name}.mixq"))
    assert isinstance(loaded.runners[fits[0]], type(engine.runners[fits[0]]))
    np.testing.assert_array_equal(engine.run(x).numpy(), loaded.run(x).numpy())


def test_float_patterns_fuse_only_private_chains():
    """The attention chain fuses into one node; when its attention weights are also a graph output (read
    elsewhere), the chain stays as it is, and so does an Erf GELU with another constant."""
    import onnx
    from onnx import TensorProto, helper

    from mixq.backends.cuda.patterns import ATTENTION_OP, fuse_float_patterns

    def graph(weights_out: bool, sqrt2: float):
        nodes = [
            helper.make_node("Mul", ["q", "c"], ["qs"], name="/Mul"),
            helper.make_node("MatMul", ["qs", "kt"], ["s"], name="/MatMul"),
            helper.make_node("Softmax", ["s"], ["w"], name="/Softmax", axis=-1),
            helper.make_node("MatMul", ["w", "v"], ["o"], name="/MatMul_1"),
            helper.make_node("Div", ["o", "r2"], ["d"], name="/Div"),
            helper.make_node("Erf", ["d"], ["e"], name="/Erf"),
            helper.make_node("Add", ["e", "one"], ["e1"], name="/Add"),
            helper.make_node("Mul", ["o", "e1"], ["g"], name="/Mul_1"),
            helper.make_node("Mul", ["g", "half"], ["out"], name="/Mul_2"),
        ]
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
                 (("c", 0.25), ("r2", sqrt2), ("one", 1.0), ("half", 0.5))]  # fmt: skip
        value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 2, 5, 4]) for n in ("q", "v")]
        kt = helper.make_tensor_value_info("kt", TensorProto.FLOAT, ["b", 2, 4, 5])
        outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 2, 5, 4])]
        if weights_out:
            outs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, ["b", 2, 5, 5]))
        g = helper.make_graph(nodes, "g", [*value, kt], outs, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("mixq", 1)])

    fused = [n.op_type for n in fuse_float_patterns(graph(False, 2**0.5)).graph.node]
    assert fused == [ATTENTION_OP, "Gelu"]
    kept = [n.op_type for n in fuse_float_patterns(graph(True, 1.5)).graph.node]
    assert kept == [n.op_type for n in graph(True, 1.5).graph.node]
    onnx.checker.check_model(graph(True, 1.5))


@needs_triton
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_attention_matmuls_asked_8_bit_run_float_on_their_quantized_operands(build, precision):
    """The cuda backend has no 8-bit kernel for a matmul of two activations: it quantizes and dequantizes both
    operands as the Q/DQ graph says (so it matches the fake-quant model) and runs the matmul in float, and the
    placement row says so."""
    from mixq.backends.cuda.engine import ATTENTION_MATMUL_NOTE

    matmul_entry = {"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]}
    if precision == "fp8":
        config = [*LINEAR_FP8, {**matmul_entry, "quant_dtype": "fp8"}]
    else:
        config = [*LINEAR_INT8, matmul_entry]
    model, qdq, shape = _transformer_export("tiny_vit", config)
    engine = build(qdq, shape)
    torch.manual_seed(1)
    x = torch.randn(*shape) * 1.5
    with torch.no_grad():
        ref = model(x)
    assert sqnr_db(ref, engine.run(x)) >= 30.0
    rows = {r.layer: r for r in engine.placement()}
    matmuls = {n for n, info in qdq.layers.items() if info["op_type"] == "MatMul"}
    assert len(matmuls) == 4
    assert {rows[n].runs_as for n in matmuls} == {"fp32"} and {rows[n].note for n in matmuls} == {ATTENTION_MATMUL_NOTE}
    assert {r.runs_as for n, r in rows.items() if n not in matmuls and r.requested == precision} == {precision}
