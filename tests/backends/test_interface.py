"""The backend interface: every registered backend declares what it can run (read without building), and
``auto``, the search and ``speedup`` ask those declarations instead of naming backends."""

import pytest

from mixq.backends import EngineError, backends_on, list_backends, registered_backend
from mixq.backends.base import PRECISIONS


@pytest.mark.parametrize("name", list_backends())
def test_every_backend_declares_device_and_precisions(name):
    backend = registered_backend(name)
    assert backend.name == name
    assert backend.device in ("cpu", "cuda")
    assert "fp32" in backend.precisions and backend.precisions <= PRECISIONS
    assert backend.emulated <= PRECISIONS and not (backend.emulated & backend.precisions)


def test_backends_by_device_cover_the_registry_once():
    cpu, cuda = backends_on("cpu"), backends_on("cuda")
    assert sorted(cpu + cuda) == list_backends() and not set(cpu) & set(cuda)
    assert set(cpu) == {"onnxruntime", "openvino"} and set(cuda) == {"cuda", "tensorrt"}
    assert registered_backend("tpu") is None


def test_auto_candidates_come_from_the_devices():
    from mixq import auto

    on_cpu = auto.candidate_backends()
    assert on_cpu and all(registered_backend(n).device == "cpu" for n in on_cpu)
    assert not hasattr(auto, "CPU_BACKENDS") and not hasattr(auto, "GPU_BACKENDS")


def test_search_offers_no_emulated_precision():
    from mixq.search.space import CHOICES, offered_on, runs_on

    for name in list_backends():
        backend = registered_backend(name)
        for choice in CHOICES.values():
            assert offered_on(choice.name, name) == (choice.precision not in backend.emulated)
    assert set(runs_on("fp8")) == {n for n in list_backends() if "fp8" not in registered_backend(n).emulated}


def test_get_backend_of_an_unknown_name_is_one_clear_error():
    with pytest.raises(EngineError, match="unknown backend 'tpu'"):
        from mixq.backends import get_backend

        get_backend("tpu")


def _engine_file(path, backend: str, **manifest):
    import json
    import zipfile

    body = {"format": "mixq-engine", "format_version": 1, "backend": backend, "sha256": {}, **manifest}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.json", json.dumps(body))
    return path


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "tensorrt"])
@pytest.mark.parametrize(
    "manifest", [{}, {"input_shape": [1, 3]}, {"input_shape": "x", "layers": {}}, {"input_shape": [1], "layers": []}]
)
def test_a_bad_manifest_is_one_engine_error_naming_the_file(tmp_path, name, manifest):
    """One load path for every backend (Backend.load): no KeyError/TypeError from a manifest or member that is
    missing or malformed, TensorRT's included (needs no TensorRT: the file is refused before)."""
    path = _engine_file(tmp_path / f"{name}.mixq", name, **manifest)
    with pytest.raises(EngineError, match=rf"{name}\.mixq: engine manifest or members are incomplete"):
        registered_backend(name).load(path)


def test_tensorrt_file_without_its_plan_says_so(tmp_path):
    path = _engine_file(tmp_path / "t.mixq", "tensorrt", input_shape=[1, 3], layers={})
    with pytest.raises(EngineError, match="no engine.plan member"):
        registered_backend("tensorrt").load(path)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "tensorrt"])
def test_build_legalizes_first_through_the_backend_hook(name, monkeypatch):
    """Backend.build calls legalize (the hook every backend has) and then build_legal with its result."""
    from types import SimpleNamespace

    from mixq.backends import BuildOptions
    from mixq.backends.base import Backend, Legalized

    backend = registered_backend(name)
    calls = []
    legal = Legalized(object(), {"conv": {"precision": "int8"}})
    monkeypatch.setattr(backend, "legalize", lambda model, layers, options: calls.append(("legalize", model)) or legal)
    monkeypatch.setattr(backend, "build_legal", lambda got, shape, options: calls.append(("build", got, shape)))
    qdq = SimpleNamespace(model="model", layers={"conv": {"precision": "int8"}})
    backend.build(qdq, [1, 3], BuildOptions())
    assert calls == [("legalize", "model"), ("build", legal, (1, 3))]
    assert Backend.legalize(backend, "m", {}, BuildOptions()) == Legalized("m", {})  # the default: unchanged


def test_build_time_calibration_without_onnx_runtime_is_one_clear_error(monkeypatch):
    """Calibration runs the graph on ONNX Runtime for every backend (TensorRT too): without it, one line
    saying so before any work, not an ImportError from deep inside a legalization."""
    import sys

    from mixq.backends.onnx_graph import calibrated_ranges

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(EngineError, match="runs the graph on ONNX Runtime's CPU provider, which is not installed"):
        calibrated_ranges(object(), ["t"], [object()], "TensorRT legalization")


def test_calibrated_ranges_drop_non_finite_tensors():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from mixq.backends.onnx_graph import calibrated_ranges

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["log"]), helper.make_node("Relu", ["x"], ["relu"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("relu", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    samples = [np.array([[0.0, 1.0, 4.0]], np.float32), np.array([[2.0, 0.5, -3.0]], np.float32)]
    ranges = calibrated_ranges(model, ["log", "relu"], samples, "test")
    assert ranges == {"relu": (0.0, 4.0)}  # log(0) = -inf and log(-3) = nan: left out
