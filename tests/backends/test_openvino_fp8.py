"""OpenVINO with fp8 (float8e4m3fn Q/DQ, opset 19) layers: weights read right whatever their storage, fp8
rounding emulated (through float16, so not exact): the engine says so, warns, and backend="auto" skips it."""

import warnings

import numpy as np
import onnx
import pytest
import torch

from mixq.backends import BuildOptions
from mixq.backends.openvino.engine import OpenVINOBackend, OpenVINOEngine, fp8_initializers_as_raw
from mixq.spec import FP8_E4M3

from .fp8_graphs import INPUT_SHAPE, Fp8Graph, fp8_steps

pytest.importorskip("openvino")


def _build(model, input_shape, layers) -> OpenVINOEngine:
    """What OpenVINOBackend.build does with an export: legalize (the fp8 rewrites), then the engine."""
    backend, options = OpenVINOBackend(), BuildOptions(threads=1)
    return backend.build_legal(backend.legalize(model, layers, options), input_shape, options)


def _engine(graph: Fp8Graph) -> OpenVINOEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build(graph.model, INPUT_SHAPE, graph.layers)


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "int32_data"])
def test_fp8_engine_computes_the_fake_quant_math_rounded_through_float16(raw):
    """OpenVINO rounds x/scale to float16, then to float8. Against that math the engine is exact up to float32
    summation order (at most one fp8 step of the logits, on few values), whatever the weights' storage (the
    int32_data ones OpenVINO would misread are rewritten); against mixq's math it is not, hence ``inexact``."""
    graph = Fp8Graph(raw=raw)
    engine = _engine(graph)
    x = torch.randn(64, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(2))
    got = engine.run(x)
    double = graph.reference(x, through_fp16=True)
    assert float(fp8_steps(got, double, graph.s_y).max()) <= 1.0
    assert float((got == double).float().mean()) >= 0.99
    assert not torch.equal(got, graph.reference(x))


def test_int32_data_weights_are_rewritten_as_raw_data_with_the_same_values():
    model = Fp8Graph(raw=False).model
    before = {i.name: onnx.numpy_helper.to_array(i).astype(np.float32) for i in model.graph.initializer}
    assert fp8_initializers_as_raw(model) == 5  # zp, w1_q, w1_zp, w2_q, w2_zp
    for init in model.graph.initializer:
        assert init.data_type != onnx.TensorProto.FLOAT8E4M3FN or (init.raw_data and not init.int32_data)
        assert np.array_equal(onnx.numpy_helper.to_array(init).astype(np.float32), before[init.name])
    assert fp8_initializers_as_raw(model) == 0


def test_fp8_engine_is_marked_inexact_warns_and_notes_it():
    graph = Fp8Graph()
    with pytest.warns(UserWarning, match="not exact for its fp8 layers"):
        engine = _build(graph.model, INPUT_SHAPE, graph.layers)
    assert "float16" in engine.inexact and "conv" in engine.inexact
    rows = {r.layer: r for r in engine.placement()}
    assert rows["conv"].requested == "fp8" and rows["conv"].runs_as == "fp32"
    assert "asked fp8" in rows["conv"].note and "emulated" in rows["conv"].note


def test_openvino_really_rounds_through_float16():
    """The reason for ``inexact``: one Q/DQ pair on values next to fp8 midpoints, against the exact rounding
    and against rounding through float16 first."""
    from onnx import TensorProto, helper, numpy_helper

    from .fp8_graphs import fp8_initializer

    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="/a/Q"),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="/a/DQ"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s"), fp8_initializer("zp", np.zeros(()))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)].unique()
    mids = (codes[1:] + codes[:-1]) / 2
    x = torch.cat([mids * (1 + 2.0**-13), mids * (1 - 2.0**-13)])  # off the midpoints by less than fp16's step
    x = torch.nn.functional.pad(x, (0, 4096 - len(x))).view(1, -1)
    engine = _engine_of(model)
    got = engine.run(x)
    exact = x.clamp(-FP8_E4M3.max, FP8_E4M3.max).to(torch.float8_e4m3fn).float()
    via_f16 = x.clamp(-FP8_E4M3.max, FP8_E4M3.max).half().to(torch.float8_e4m3fn).float()
    assert not torch.equal(got, exact)
    assert torch.equal(got, via_f16)


def _engine_of(model) -> OpenVINOEngine:
    return _build(model, (1, 4096), {})


def test_fp8_engine_file_round_trip_stays_marked_inexact(tmp_path):
    from mixq.backends import load_engine

    engine = _engine(Fp8Graph(raw=False))
    path = engine.save(tmp_path / "fp8.mixq")
    with pytest.warns(UserWarning, match="not exact for its fp8 layers"):
        loaded = load_engine(path)
    x = torch.randn(8, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(3))
    assert loaded.inexact == engine.inexact and torch.equal(loaded.run(x), engine.run(x))
