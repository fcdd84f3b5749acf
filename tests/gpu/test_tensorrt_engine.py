"""TensorRT engines built and run: needs TensorRT 10.12+ or 11 (strongly typed API) and a CUDA GPU.

Skipped elsewhere with the reason shown. TensorRT cannot be installed on this project's machines, so these
tests have never run: they are written against the documented API (see docs/tensorrt.md). With
``MIXQ_RECORD_TENSORRT=<dir>`` the placement test writes the real inspector JSON there, to commit as a
recorded sample for the CPU parser tests.
"""

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

trt = pytest.importorskip(
    "tensorrt",
    reason="TensorRT is not installed (pip install 'mixq[tensorrt]', tensorrt>=10.12,<12): TensorRT engine "
    "build/run is not tested on this machine",
)
if not torch.cuda.is_available():
    pytest.skip("TensorRT is installed but no CUDA GPU is visible", allow_module_level=True)

import mixq  # noqa: E402
from engine_cases import ALL8_WITH_LOGITS, TUTORIAL_STYLE, _centred, check_fp32_parity, qat_lenet, sqnr_db  # noqa: E402
from mixq.backends import BuildOptions, get_backend, load_engine  # noqa: E402
from mixq.backends.tensorrt.engine import SUPPORTED_VERSIONS, _version  # noqa: E402
from mixq.export import export_qdq_onnx  # noqa: E402
from mixq.nni import ModelSpeedup  # noqa: E402
from mixq.zoo.models import create_model  # noqa: E402

if not SUPPORTED_VERSIONS[0] <= _version(trt.__version__) < SUPPORTED_VERSIONS[1]:
    pytest.skip(f"TensorRT {trt.__version__} is outside the supported 10.12 .. 11.x", allow_module_level=True)

FC3_FP16 = [*ALL8_WITH_LOGITS[:2], {"quant_types": ["input", "weight"], "quant_bits": 16, "op_names": ["fc3"]}]


def _ptq_lenet(config, batches=4):
    torch.manual_seed(0)
    model = create_model("lenet").eval()
    mixq.prepare_(model, config, mixq.PTQ())
    calib = [torch.randn(64, 1, 28, 28) for _ in range(batches)]
    mixq.calibrate_(model, lambda m: [m(x) for x in calib])
    return model, export_qdq_onnx(mixq.deploy_model(model), (64, 1, 28, 28), mixq.export_calibration(model))


def _build(qdq, shape=(64, 1, 28, 28), **options):
    return get_backend("tensorrt").build(qdq, shape, BuildOptions(**options))


def _legalized_reference(engine, x: np.ndarray) -> np.ndarray:
    """The legalized graph the engine was built from, run literally by ONNX Runtime on the CPU."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(engine.onnx_bytes, so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _output_scale(engine) -> float:
    import onnx

    from mixq.backends.tensorrt.check import GraphIndex

    g = GraphIndex(onnx.load_from_string(engine.onnx_bytes))
    q = next(n for n in g.nodes if n.name == "/fc3/output_qdq/QuantizeLinear")
    return float(g.value(q.input[1]))


def test_int8_engine_computes_the_legalized_graph_on_real_mnist(data_dir):
    """TensorRT and ONNX Runtime run the same Q/DQ graph: the logits (on fc3's int8 output grid) may differ by
    one step where accumulation order moves a value across a rounding boundary, rarely; classes agree."""
    model, _, task = qat_lenet(data_dir)
    speedup = ModelSpeedup(model, (500, 1, 28, 28), batchsize=500, backend="tensorrt").compress()
    engine = speedup.engine
    scale = _output_scale(engine)
    batches = [x for x, _ in torch.utils.data.DataLoader(task.test_set, batch_size=500)]
    batches.append(torch.randn(500, 1, 28, 28) * 1.5)
    steps, agree, n = [], 0, 0
    for x in batches:
        out = engine.run(x)
        ref = torch.from_numpy(_legalized_reference(engine, x.numpy()))
        steps.append(((_centred(out) - _centred(ref)).abs() / scale).flatten())
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        n += len(x)
    steps = torch.cat(steps)
    assert agree / n >= 0.999, agree / n
    assert float(steps.quantile(0.999)) <= 1.0 and float(steps.max()) <= 2.0


def test_int8_engine_against_the_fake_quant_model(data_dir):
    """Against the fake-quant model (uint8 activations) the engine's int8 grids are coarser by up to 255/127
    (docs/tensorrt.md): classes still agree on real images."""
    model, _, task = qat_lenet(data_dir)
    speedup = ModelSpeedup(model, (500, 1, 28, 28), batchsize=500, backend="tensorrt").compress()
    agree, n, sq = 0, 0, []
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(task.test_set, batch_size=500):
            out, ref = speedup.engine.run(x), model(x)
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            n += len(x)
            sq.append(sqnr_db(_centred(ref), _centred(out)))
    assert agree / n >= 0.99, agree / n
    assert min(sq) > 25, min(sq)


def test_fp32_engine_matches_the_float_model():
    assert check_fp32_parity("tensorrt") < 1e-4  # TF32 is off: fp32 layers are fp32


def test_batches_above_the_profile_run_in_chunks_and_outputs_are_float32():
    _, qdq = _ptq_lenet(ALL8_WITH_LOGITS)
    engine = _build(qdq, max_batch=64, opt_batch=32)
    assert engine.profile_shapes == ((1, 1, 28, 28), (32, 1, 28, 28), (64, 1, 28, 28))
    assert engine.output_dtype == torch.float32
    x = torch.randn(200, 1, 28, 28)
    out = engine.run(x)
    assert out.shape == (200, 10) and out.dtype == torch.float32 and out.device.type == "cpu"
    parts = torch.cat([engine.run(x[i : i + 64]) for i in range(0, 200, 64)])
    torch.testing.assert_close(out, parts, rtol=0, atol=0)


def test_placement_from_the_real_inspector_shows_int8_convs_and_gemms():
    _, qdq = _ptq_lenet(ALL8_WITH_LOGITS)
    engine = _build(qdq)
    record = os.environ.get("MIXQ_RECORD_TENSORRT")
    if record:
        major = _version(trt.__version__)[0]
        (Path(record) / f"recorded_lenet_int8_trt{major}.json").write_text(engine.engine_information())
    rows = {r.layer: r for r in engine.placement()}
    assert all(rows[n].runs_as == "int8" for n in ("conv1", "conv2", "fc1", "fc2")), rows
    assert all(rows[n].kernels for n in ("conv1", "conv2", "fc1", "fc2"))


def test_fp16_layer_runs_fp16_in_a_strongly_typed_engine():
    _, qdq = _ptq_lenet(FC3_FP16)
    engine = _build(qdq)
    rows = {r.layer: r for r in engine.placement()}
    assert rows["fc3"].runs_as == "fp16", rows["fc3"]
    assert rows["conv1"].runs_as == "int8"
    x = torch.randn(64, 1, 28, 28)
    ref = torch.from_numpy(_legalized_reference(engine, x.numpy()))
    assert sqnr_db(_centred(ref), _centred(engine.run(x))) > 30


def test_profile_reports_positive_times_for_the_conv_layers():
    _, qdq = _ptq_lenet(ALL8_WITH_LOGITS)
    engine = _build(qdq)
    times = {t.layer: t.microseconds for t in engine.profile(torch.randn(64, 1, 28, 28), runs=5)}
    assert times["conv1"] > 0 and times["conv2"] > 0


def test_residual_net_with_calibration_data_runs_every_conv_int8():
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    x = torch.randn(64, 3, 32, 32)
    mixq.prepare_(model, TUTORIAL_STYLE, mixq.PTQ())
    mixq.calibrate_(model, lambda m: m(x))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (64, 3, 32, 32), mixq.export_calibration(model))
    engine = _build(qdq, (64, 3, 32, 32), calibration_data=(x.numpy(),))
    rows = {r.layer: r for r in engine.placement()}
    convs = [n for n, info in qdq.layers.items() if info["op_type"] == "Conv2d"]
    assert all(rows[c].runs_as in ("int8", "fused") for c in convs), {c: rows[c] for c in convs}


def test_engine_file_round_trip(tmp_path):
    _, qdq = _ptq_lenet(ALL8_WITH_LOGITS)
    engine = _build(qdq)
    x = torch.randn(16, 1, 28, 28)
    loaded = load_engine(engine.save(tmp_path / "lenet.mixq"))
    torch.testing.assert_close(loaded.run(x), engine.run(x), rtol=0, atol=0)
    assert loaded.profile_shapes == engine.profile_shapes
