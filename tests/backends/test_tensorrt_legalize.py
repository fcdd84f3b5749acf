"""What the TensorRT legalization computes, run on CPU (ONNX Runtime with graph optimizations off, so the graph
runs literally; the ONNX reference evaluator for float16 graphs)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import mixq
from engine_cases import TUTORIAL_STYLE, _centred, sqnr_db
from mixq.backends.tensorrt.check import GraphIndex, check
from mixq.backends.tensorrt.legalize import legalize, symmetric_scale
from mixq.export import export_qdq_onnx
from mixq.zoo.data import load_mnist
from mixq.zoo.models import create_model

SYMMETRIC = [
    {
        "quant_types": ["input", "weight"],
        "quant_bits": 8,
        "op_types": ["default"],
        "quant_dtype": "int",
        "quant_scheme": {"input": "per_tensor_symmetric", "weight": "per_channel_symmetric"},
    }
]


def _run(model, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(outputs, {session.get_inputs()[0].name: x})


def _ptq(name, config, x, extra_layer_bits=32):
    torch.manual_seed(0)
    model = create_model(name).eval()
    mixq.prepare_(model, config, mixq.PTQ())
    mixq.calibrate_(model, lambda m: m(x))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (2, *x.shape[1:]), mixq.export_calibration(model), extra_layer_bits)
    return model, qdq


def _scales(model) -> dict[str, float]:
    g = GraphIndex(model)
    return {n.name: float(g.value(n.input[1])) for n in g.nodes if n.op_type == "QuantizeLinear"}


def test_already_symmetric_graph_computes_exactly_the_same():
    """A config TensorRT accepts as it is (symmetric int8, zero points 0) is only rewritten where TensorRT
    needs another form (int32 bias DQ -> the float bias it computes): outputs bit-identical, scales kept."""
    x = torch.randn(32, 1, 28, 28)
    _, qdq = _ptq("lenet", SYMMETRIC, x[:16])
    legal = legalize(qdq.model, qdq.layers)
    assert check(legal.model) == []
    assert _scales(legal.model) == _scales(qdq.model)
    fresh = (torch.randn(64, 1, 28, 28) * 1.5).numpy()
    for batch in (x.numpy(), fresh):
        np.testing.assert_array_equal(_run(legal.model, batch)[0], _run(qdq.model, batch)[0])


def test_uint8_activation_scale_is_amax_over_127_of_the_grid():
    x = torch.randn(16, 1, 28, 28)
    _, qdq = _ptq("lenet", TUTORIAL_STYLE, x)
    g = GraphIndex(qdq.model)
    old = {n.name: n for n in g.nodes if n.op_type == "QuantizeLinear"}
    new = _scales(legalize(qdq.model, qdq.layers).model)
    for name, q in old.items():
        s, zp = float(g.value(q.input[1])), int(g.value(q.input[2]))
        lo, hi = (0 - zp) * s, (255 - zp) * s
        assert new[name] == pytest.approx(max(-lo, hi) / 127, rel=1e-6), name
    assert new["/relu1/output_qdq/QuantizeLinear"] == pytest.approx(
        255 / 127 * float(g.value(old["/relu1/output_qdq/QuantizeLinear"].input[1])), rel=1e-6
    )  # a ReLU output [0, hi]: one bit of resolution lost, no unsigned int8 in TensorRT


@pytest.mark.parametrize("images", ["mnist", "random"])
def test_symmetric_activations_cost_at_most_the_predicted_sqnr(images, data_dir):
    """Each activation step grows by at most 255/127 (uint8 -> int8 zero point 0); weights are unchanged.
    Quantization noise adds up roughly linearly through the net, so its power grows by at most
    (255/127)^2 = 4.03x: the legalized graph's SQNR against the float model may fall at most 6.05 dB below the
    fake-quant model's (1 dB allowed for the nonlinearity of ReLU and max pooling)."""
    torch.manual_seed(0)
    real = load_mnist(train=False, root=data_dir, limit=512).tensors[0]
    calib = real[:256]
    x = real[256:] if images == "mnist" else torch.randn(256, 1, 28, 28) * 1.5
    float_model = create_model("lenet").eval()
    model, qdq = _ptq("lenet", TUTORIAL_STYLE, calib)
    float_model.load_state_dict(mixq.deploy_model(model).state_dict())
    legal = legalize(qdq.model, qdq.layers)
    with torch.no_grad():
        ref, fake = float_model(x), model(x)
    engine_like = torch.from_numpy(_run(legal.model, x.numpy())[0])
    # log_softmax outputs: centring each row removes the logsumexp shift, leaving the logits minus their mean
    fq_db, legal_db = sqnr_db(_centred(ref), _centred(fake)), sqnr_db(_centred(ref), _centred(engine_like))
    assert legal_db >= fq_db - 20 * np.log10(255 / 127) - 1.0, (fq_db, legal_db)


def test_float_bias_is_the_dequantized_int32_bias():
    _, qdq = _ptq("lenet", TUTORIAL_STYLE, torch.randn(16, 1, 28, 28))
    g = GraphIndex(qdq.model)
    dq = next(n for n in g.nodes if n.name == "/fc1/BiasDequantizeLinear")
    expected = g.value(dq.input[0]).astype(np.float32) * g.value(dq.input[1])
    legal = GraphIndex(legalize(qdq.model, qdq.layers).model)
    gemm = next(n for n in legal.nodes if n.name == "/fc1/Gemm")
    np.testing.assert_array_equal(legal.value(gemm.input[2]), expected)


def test_affine_weights_are_requantized_within_half_a_new_step():
    config = [
        {
            "quant_types": ["input", "weight"],
            "quant_bits": 8,
            "op_types": ["default"],
            "quant_scheme": {"input": "per_tensor_affine", "weight": "per_tensor_affine"},
            "quant_dtype": {"input": "uint", "weight": "uint"},
        }
    ]
    _, qdq = _ptq("lenet", config, torch.randn(16, 1, 28, 28))
    before, after = GraphIndex(qdq.model), GraphIndex(legalize(qdq.model, qdq.layers).model)
    for name in ("/conv1/DequantizeLinear", "/fc2/DequantizeLinear"):
        old = next(n for n in before.nodes if n.name == name)
        new = next(n for n in after.nodes if n.name == name)
        q, scale, zp = (after.value(i) for i in new.input)
        assert q.dtype == np.int8 and not zp.any() and scale.size == q.shape[0]  # per output channel, axis 0
        w_old = (before.value(old.input[0]).astype(np.float32) - before.value(old.input[2])) * before.value(
            old.input[1]
        )
        w_new = q.astype(np.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))
        step = scale.reshape(-1, *[1] * (q.ndim - 1))
        assert np.all(np.abs(w_new - w_old) <= step / 2 * (1 + 1e-5))


def test_residual_input_scale_is_the_tightest_covering_the_calibration_data():
    x = torch.randn(32, 3, 32, 32)
    _, qdq = _ptq("tiny_resnet", TUTORIAL_STYLE, x[:16])
    legal = legalize(qdq.model, qdq.layers, calibration_data=(x[:16].numpy(), x[16:].numpy()))
    g = GraphIndex(legal.model)
    q = next(n for n in g.nodes if n.op_type == "QuantizeLinear" and "shortcut" in n.input[0])
    seen = np.concatenate([_run_with(legal.model, b, q.input[0]).ravel() for b in (x[:16].numpy(), x[16:].numpy())])
    assert float(g.value(q.input[1])) == pytest.approx(symmetric_scale(float(seen.min()), float(seen.max())), rel=1e-6)


def _run_with(model, x, tensor):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    return _run(probe, x, [tensor])[0]


def test_fp16_graph_runs_in_float16_and_stays_far_above_int8_error():
    """``extra_layer_bits=16`` on a float model: every layer reads float16 in the graph (strong typing), the
    output differs from fp32 (it really ran in half precision) and its SQNR beats what any 8-bit tensor allows
    (~40 dB); the input and output stay float32."""
    x = torch.randn(8, 1, 28, 28)
    qdq = export_qdq_onnx(create_model("lenet").eval(), (2, 1, 28, 28), {}, extra_layer_bits=16)
    legal = legalize(qdq.model, qdq.layers)
    assert check(legal.model) == []
    assert legal.model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = {i.name: i.data_type for i in legal.model.graph.initializer}
    conv = next(n for n in legal.model.graph.node if n.op_type == "Conv")
    assert weights[conv.input[1]] == onnx.TensorProto.FLOAT16
    half = ReferenceEvaluator(legal.model).run(None, {"input": x.numpy()})[0]
    full = ReferenceEvaluator(qdq.model).run(None, {"input": x.numpy()})[0]
    assert half.dtype == np.float32 and not np.array_equal(half, full)
    assert sqnr_db(torch.from_numpy(full), torch.from_numpy(half)) > 40


def test_mixed_fp16_layers_are_cast_and_int8_layers_keep_their_qdq():
    config = [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
        {"quant_types": ["input", "weight"], "quant_bits": 16, "op_names": ["fc3"]},
    ]
    _, qdq = _ptq("lenet", config, torch.randn(16, 1, 28, 28))
    legal = legalize(qdq.model, qdq.layers)
    assert check(legal.model) == []
    nodes = {n.name: n for n in legal.model.graph.node}
    gemm = nodes["/fc3/Gemm"]
    types = {i.name: i.data_type for i in legal.model.graph.initializer}
    assert types[gemm.input[1]] == onnx.TensorProto.FLOAT16 and gemm.input[0].endswith("_to_fp16")
    assert "cast to float16" in " ".join(legal.layers["fc3"]["tensorrt"])
    assert {n.op_type for n in legal.model.graph.node if n.name.startswith("/conv1/")} >= {"QuantizeLinear", "Conv"}
    assert numpy_helper.to_array(next(i for i in legal.model.graph.initializer if i.name == gemm.input[1])).dtype == (
        np.float16
    )


def test_legalization_leaves_the_input_model_alone():
    _, qdq = _ptq("lenet", TUTORIAL_STYLE, torch.randn(16, 1, 28, 28))
    before = qdq.model.SerializeToString()
    legalize(qdq.model, qdq.layers, calibration_data=(np.random.randn(4, 1, 28, 28).astype(np.float32),))
    assert qdq.model.SerializeToString() == before
