"""The exported fp8 Q/DQ ONNX, run by a plain onnxruntime.InferenceSession, equals the fake-quant model
(what is checked and why the tolerances are what they are: mixq/zoo/fp8_parity.py)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import mixq
from mixq.export import FP8_OPSET, export_qdq_onnx
from mixq.primitives import FP8_TORCH_DTYPE, fake_quantize_fp8, quantize
from mixq.spec import FP8_E4M3
from mixq.zoo.data import load_cifar10, load_mnist
from mixq.zoo.fp8_parity import GRID, batches_of, compare, logits_fp8_config
from mixq.zoo.models import create_model


def _session(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FP8_OPSET)])
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _fp8_initializer(name: str, q: torch.Tensor):
    return helper.make_tensor(
        name, TensorProto.FLOAT8E4M3FN, list(q.shape), q.view(torch.uint8).numpy().tobytes(), True
    )


def test_onnxruntime_float8_qdq_is_fake_quantize_fp8_bit_for_bit():
    """ORT's QuantizeLinear -> DequantizeLinear with a FLOAT8E4M3FN zero point (opset 19, saturate=1) computes
    exactly :func:`fake_quantize_fp8`: every midpoint between grid values (ties), values past 448 steps, zeros,
    subnormals and random values over many binades."""
    scale = np.float32(0.037)
    pos = GRID[GRID > 0].double()
    mids = (pos[:-1] + pos[1:]) / 2
    special = torch.cat([mids, -mids, pos, torch.tensor([0.0, -0.0, 448.5, 464.0, 1e4, -1e4, 2.0**-10, 2.0**-12])])
    x = torch.cat([(special * float(scale)).float(), torch.randn(20000) * torch.logspace(-4, 3, 20000)])
    sess = _session(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(scale), "s"), _fp8_initializer("z", torch.zeros((), dtype=FP8_TORCH_DTYPE))],
    )
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    assert torch.equal(got, fake_quantize_fp8(x, torch.tensor(scale)))


def test_onnxruntime_dequantizes_fp8_weights_per_channel_as_mixq_does():
    w = torch.randn(6, 3, 3, 3) * torch.logspace(-3, 1, 6).reshape(-1, 1, 1, 1)
    scale = (w.abs().amax(dim=(1, 2, 3)) / 448).float()
    q = quantize(w, scale, None, FP8_E4M3, 0)
    sess = _session(
        [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=0)],
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 3, 3, 3])],
        [
            _fp8_initializer("w", q),
            numpy_helper.from_array(scale.numpy(), "s"),
            _fp8_initializer("z", torch.zeros(6, dtype=FP8_TORCH_DTYPE)),
        ],
    )
    got = torch.from_numpy(sess.run(None, {})[0])
    assert torch.equal(got, fake_quantize_fp8(w, scale, 0))


def _trained(name: str, train, loss_fn, limit: int):
    """``name`` after one short epoch of float training on real data (enough for meaningful top-1 margins)."""
    torch.manual_seed(0)
    model = create_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    for i in range(0, limit, 64):
        optimizer.zero_grad()
        loss_fn(model(x[i : i + 64]), y[i : i + 64]).backward()
        optimizer.step()
    return model.eval()


CASES = {
    # name: (loader, loss, training images, test images, last layer, input shape)
    "lenet": (load_mnist, F.nll_loss, 3000, 1000, "fc3", (1, 1, 28, 28)),
    "tiny_resnet": (load_cifar10, F.cross_entropy, 1500, 400, "fc", (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exported_fp8_graph_matches_fake_quant_model(name, data_dir):
    load, loss_fn, train_n, test_n, last, shape = CASES[name]
    train, test = load(True, data_dir, limit=train_n), load(False, data_dir, limit=test_n)
    model = _trained(name, train, loss_fn, train_n)
    mixq.prepare_(model, logits_fp8_config(model, last), mixq.PTQ(), example_input=train.tensors[0][:1])
    mixq.calibrate_(model, lambda m: [m(x) for x in batches_of(train.tensors[0][:512], 128)])
    qdq = export_qdq_onnx(mixq.deploy_model(model), shape, mixq.export_calibration(model))
    torch.manual_seed(1)
    for inputs, what in ((test.tensors[0], "real"), (torch.randn(200, *shape[1:]), "random")):
        r = compare(model, qdq, batches_of(inputs, 250))
        print(name, what, r)
        assert r["images"] == len(inputs)
        assert r["qdq_exact"], r  # each quantized tensor is fake_quantize_fp8 of its own input, bit for bit
        assert r["first_flips_one_step"], r  # where inputs agree, float summation order moves at most one step
        if what == "real":
            assert r["agreement"] >= 0.995, r  # the project's target for engines vs the fake-quant model
