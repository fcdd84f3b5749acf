"""Int8 exactness on x86 CPUs without VNNI (u8 x s8 kernels saturate for |q| > 64): the shared pieces in
mixq.backends.cpu_features, the weight split OpenVINO engines use, and the layering rules around them."""

import ast
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import mixq
import mixq.backends.cpu_features as cf
from mixq.export import export_qdq_onnx
from mixq.zoo.models import TorchModel

BACKENDS = Path(mixq.__file__).parent / "backends"


def _lenet_qdq(batch=64):
    """A PTQ LeNet with random weights (per-channel int8: every channel reaches |q| = 127)."""
    torch.manual_seed(0)
    model = TorchModel().eval()
    config = [
        {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    mixq.prepare_(model, config, mixq.PTQ())
    x = torch.randn(batch, 1, 28, 28)
    mixq.calibrate_(model, lambda m: m(x))
    return export_qdq_onnx(mixq.deploy_model(model), (batch, 1, 28, 28), mixq.export_calibration(model))


def _literal(model):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_split_int8_weights_keeps_every_half_safe_and_the_graph_equal():
    qdq = _lenet_qdq()
    maxima = cf.int8_weight_maxima(qdq.model)
    assert sorted(cf.layer_maxima(maxima, qdq.layers)) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert max(maxima.values()) == 127
    split = onnx.ModelProto()
    split.CopyFrom(qdq.model)
    done = cf.split_int8_weights(split, set(maxima))
    assert done == set(maxima)
    onnx.checker.check_model(split)
    after = cf.int8_weight_maxima(split)
    assert len(after) == 2 * len(maxima) and max(after.values()) <= cf.SAFE_U8S8_WEIGHT
    # lo + hi gives back every weight exactly
    inits = {i.name: numpy_helper.to_array(i).astype(np.int16) for i in split.graph.initializer}
    orig = {i.name: numpy_helper.to_array(i).astype(np.int16) for i in qdq.model.graph.initializer}
    for node in qdq.model.graph.node:
        if node.name in maxima:
            w = node.input[0]
            np.testing.assert_array_equal(inits[w] + inits[f"{w}_hi"], orig[w])
    # The Q/DQ graph executed literally: the same function up to float rounding at the sum (a few ulps),
    # except where a value sits on a rounding tie of a later quantizer and lands one step away (rare).
    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32) * 1.5
    a, b = _literal(qdq.model)(x), _literal(split)(x)
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
    row_err = (np.abs(a - b) / np.abs(a).max()).max(1)
    assert float((row_err < 1e-6).mean()) >= 0.95, np.sort(row_err)[-5:]


def test_split_of_no_nodes_changes_nothing():
    qdq = _lenet_qdq()
    model = onnx.ModelProto()
    model.CopyFrom(qdq.model)
    assert cf.split_int8_weights(model, set()) == set()
    assert model == qdq.model


def test_saturation_message_names_the_layers_and_the_fix():
    msg = cf.saturation_message("OpenVINO", {"conv2": 127, "conv1": 90})
    assert "conv1 (|q| up to 90), conv2 (|q| up to 127)" in msg
    assert "7 bits" in msg and "|q| > 64" in msg


def test_backends_never_import_each_other():
    """The shared int8 pieces live in cpu_features; the CPU backends import it, not one another."""
    engines = {p.name for p in BACKENDS.iterdir() if (p / "__init__.py").is_file()}
    for engine in ("onnxruntime", "openvino"):
        imported = set()
        for path in (BACKENDS / engine).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                    imported.add(node.module.split(".")[0])
        assert not (imported & (engines - {engine})), (engine, imported)
        assert "cpu_features" in imported


def test_one_median_latency_for_auto_and_the_zoo():
    import mixq._timing
    import mixq.auto
    import mixq.zoo.metrics

    assert mixq.auto.median_latency is mixq._timing.median_latency is mixq.zoo.metrics.median_latency
    assert not hasattr(mixq.auto, "_median_ms")
    calls = []
    t = mixq._timing.median_latency({"a": calls.append, "b": calls.append}, 1, warmup=1, runs=4, rounds=2)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values()) and len(calls) == 2 * (1 + 4)


@pytest.mark.parametrize("vnni", [True, False])
def test_openvino_layout_follows_the_cpu_class(monkeypatch, vnni):
    """Forced CPU class: without VNNI every weight with |q| > 64 is split (and stays int8), with VNNI none;
    both engines compute the same function (the split is exact), and neither calls itself inexact."""
    pytest.importorskip("openvino")
    import mixq.backends.openvino.engine as ov_backend
    from mixq.backends import BuildOptions, get_backend

    qdq = _lenet_qdq()
    monkeypatch.setattr(ov_backend, "cpu_has_vnni", lambda: vnni)
    engine = get_backend("openvino").build(qdq, (64, 1, 28, 28), BuildOptions())
    assert engine.inexact == "" and engine.saturating_layers == {} and engine.uint8_layers == {}
    if vnni:
        assert engine.split_layers == {}
    else:
        assert set(engine.split_layers) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
        rows = {r.layer: r for r in engine.placement()}
        for layer in engine.split_layers:
            assert "split into two int8 halves" in rows[layer].note
        assert rows["conv1"].runs_as == "int8" and rows["conv2"].runs_as == "int8"
    if vnni and not cf.cpu_has_vnni():
        return  # int8 kernels of this real CPU saturate: a VNNI layout is only checked on a VNNI CPU
    x = torch.randn(64, 1, 28, 28)
    ref = torch.from_numpy(_literal(qdq.model)(x.numpy()))
    out = engine.run(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 30
