"""The backends' one reader of float8e4m3fn ONNX tensors (mixq.backends.base: fp8_array, is_fp8,
constant_values, dequantize_constant): raw_data and int32_data read to the same e4m3 values, bad tensors named,
and the backends' fp8 handling independent of what ``onnx.numpy_helper.to_array`` returns for float8 (uint8
bit codes before onnx 1.19, ml_dtypes' float8_e4m3fn since)."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixq.backends.base import (
    EngineError,
    constant_values,
    dequantize_constant,
    fold_fp8_weights,
    fp8_array,
    fp8_dtype,
    is_fp8,
)
from mixq.spec import FP8_E4M3

from .fp8_graphs import Fp8Graph, fp8_initializer

# e4m3 values: zeros, subnormals (2**-9), ordinary values, the largest finite one, negatives
VALUES = np.array([[0.0, -0.0, 2.0**-9, -(2.0**-7)], [0.5, 1.125, -3.75, 240.0], [-448.0, 448.0, 13.0, -0.1015625]])


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "int32_data"])
def test_fp8_array_reads_both_storages_to_the_same_values(raw):
    tensor = fp8_initializer("w", VALUES, raw)
    assert bool(tensor.raw_data) == raw and bool(len(tensor.int32_data)) != raw
    got = fp8_array(tensor)
    assert got.dtype == ml_dtypes.float8_e4m3fn == fp8_dtype() and got.shape == VALUES.shape
    assert np.array_equal(got.astype(np.float32), VALUES.astype(np.float32))
    assert np.array_equal(np.signbit(got.astype(np.float32)), np.signbit(VALUES))  # -0.0 kept
    assert float(np.abs(got.astype(np.float32)).max()) == FP8_E4M3.max
    scalar = fp8_array(fp8_initializer("zp", np.zeros(()), raw))
    assert scalar.shape == () and float(scalar.astype(np.float32)) == 0.0


def test_fp8_array_names_the_tensor_it_cannot_read():
    with pytest.raises(EngineError, match=r"tensor 'bias' is not FLOAT8E4M3FN"):
        fp8_array(numpy_helper.from_array(np.zeros(3, np.float32), "bias"))
    empty = TensorProto(name="w_ext", data_type=TensorProto.FLOAT8E4M3FN, dims=[2, 2])  # e.g. external data
    empty.data_location = TensorProto.EXTERNAL
    with pytest.raises(EngineError, match=r"fp8 tensor 'w_ext' has neither raw_data nor int32_data"):
        fp8_array(empty)
    short = fp8_initializer("w_short", VALUES)
    short.dims[:] = [4, 4]
    with pytest.raises(EngineError, match=r"fp8 tensor 'w_short': 12 values for shape \[4, 4\]"):
        fp8_array(short)
    none = TensorProto(name="none", data_type=TensorProto.FLOAT8E4M3FN, dims=[0, 3])
    assert fp8_array(none).shape == (0, 3)


def test_is_fp8_on_tensors_and_arrays():
    assert is_fp8(fp8_initializer("a", VALUES)) and is_fp8(fp8_initializer("b", VALUES, raw=False))
    assert is_fp8(fp8_array(fp8_initializer("a", VALUES)))
    assert not is_fp8(numpy_helper.from_array(np.zeros(2, np.int8), "z"))
    assert not is_fp8(np.zeros(2, np.uint8)) and not is_fp8(np.zeros(2, np.float32)) and not is_fp8(None)


def test_dequantize_constant_is_onnx_dequantize_linear():
    q = np.array([[-128, 0, 127], [5, -5, 100]], np.int8)
    zp, scale = np.array([-128, 3], np.int8), np.array([0.5, 0.25], np.float32)
    want = (q.astype(np.int64) - zp[:, None]).astype(np.float32) * scale[:, None]  # integer difference first
    assert np.array_equal(dequantize_constant(q, scale, zp, axis=0), want)
    assert np.array_equal(dequantize_constant(q, np.float32(0.5), None), q.astype(np.float32) * np.float32(0.5))
    f8 = fp8_array(fp8_initializer("w", VALUES))
    s = np.array([2.0, 0.5, 0.125], np.float32)
    got = dequantize_constant(f8, s, np.zeros(3, fp8_dtype()), axis=0)
    assert got.dtype == np.float32 and np.array_equal(got, VALUES.astype(np.float32) * s[:, None])


def _old_onnx_to_array(monkeypatch):
    """onnx < 1.19: ``to_array`` of a FLOAT8E4M3FN tensor gives its uint8 bit codes."""
    real = numpy_helper.to_array

    def to_array(tensor, *args, **kwargs):
        out = real(tensor, *args, **kwargs)
        return out.view(np.uint8) if tensor.data_type == TensorProto.FLOAT8E4M3FN else out

    monkeypatch.setattr(numpy_helper, "to_array", to_array)


@pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "int32_data"])
def test_backends_read_fp8_without_relying_on_to_array(monkeypatch, raw):
    """With onnx < 1.19's ``to_array`` (uint8 codes), the backends still see e4m3 values: constants through
    Identity nodes, the CPU engines' weight folding, the cuda lowering and TensorRT's legalization."""
    from mixq.backends.cuda.lower import QConv, lower
    from mixq.backends.tensorrt.check import check
    from mixq.backends.tensorrt.legalize import legalize

    graph = Fp8Graph(raw=raw)
    want = {n: fp8_array(i) for n, i in ((i.name, i) for i in graph.model.graph.initializer) if is_fp8(i)}
    _old_onnx_to_array(monkeypatch)
    assert numpy_helper.to_array(graph.model.graph.initializer[4]).dtype == np.uint8  # the old behaviour
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    model.graph.node.append(helper.make_node("Identity", ["w1_q"], ["w1_alias"], name="/alias"))
    value = constant_values(model)
    for name in ("w1_q", "w1_alias"):
        got = value(name)
        assert got.dtype == fp8_dtype() and np.array_equal(got.view(np.uint8), want["w1_q"].view(np.uint8))
    assert value("s_x").dtype == np.float32 and value("input") is None
    folded = onnx.ModelProto()
    folded.CopyFrom(graph.model)
    assert fold_fp8_weights(folded) == ["/conv/DQ_w", "/fc/DQ_w"]
    w1 = {i.name: i for i in folded.graph.initializer}["w1"]
    assert np.array_equal(numpy_helper.to_array(w1), graph.weights()[0].numpy())
    plan = lower(graph.model, graph.layers)
    assert [op.mode for op in plan.ops if isinstance(op, QConv)] == ["fp8", "fp8"] and plan.notes == {}
    legal = legalize(graph.model, graph.layers)
    assert check(legal.model) == []
    assert {i.name for i in legal.model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN} >= {
        "w1_q",
        "w2_q",
    }
