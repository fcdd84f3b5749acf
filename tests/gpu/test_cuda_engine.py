"""The cuda backend on a GPU: the trained CIFAR ResNet-18 end to end on real CIFAR-10 test images, CUDA
graphs, engine files and backend="auto". Skipped (with the reason) where there is no GPU or no Triton;
the kernels themselves are checked by tests/backends/test_cuda_kernels.py, natively when a GPU is there."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mixq
from mixq.backends import BuildOptions, EngineError, load_engine
from mixq.export import export_qdq_onnx
from mixq.speedup import ModelSpeedup, all_fp8_config, all_int8_config
from mixq.zoo.models import create_model

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the cuda backend's GPU tests need one", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'mixq[cuda]')", allow_module_level=True)

from mixq.backends.cuda.engine import CudaBackend, build_engine

CALIBRATION_IMAGES = 1000  # test images 0..999 calibrate; the agreement is measured on the other 9000


def _trained_resnet(config_fn):
    """The trained CIFAR ResNet-18 (fp32), PTQ with ``config_fn(model)`` on the first 1000 test images, and its
    export."""
    from mixq.zoo.data import load_cifar10
    from mixq.zoo.pretrained import load_pretrained

    data_dir = Path(os.environ.get("MIXQ_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    try:
        test = load_cifar10(train=False, root=data_dir)
    except mixq.MixqError as e:
        pytest.skip(f"CIFAR-10 test batch not found (set MIXQ_DATA): {e}")
    try:
        fp32 = load_pretrained("resnet18_cifar")
    except mixq.MixqError as e:
        pytest.skip(f"trained ResNet-18 weights not found: {e}")
    x, y = test.tensors
    model = load_pretrained("resnet18_cifar").cuda()
    calib = x[:CALIBRATION_IMAGES].cuda()
    mixq.prepare_(model, config_fn(model), mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(model, lambda m: [m(b) for b in calib.split(250)])
    model.eval()
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 32, 32), mixq.export_calibration(model))
    return fp32.cuda().eval(), model, qdq, x[CALIBRATION_IMAGES:], y[CALIBRATION_IMAGES:]


@pytest.fixture(scope="module")
def trained_resnet():
    return _trained_resnet(all_int8_config)


@pytest.fixture(scope="module")
def trained_resnet_fp8():
    return _trained_resnet(all_fp8_config)


def test_trained_resnet18_int8_engine_agrees_with_the_fake_quant_model(trained_resnet):
    _check_agreement(*trained_resnet, "int8")


def test_trained_resnet18_fp8_engine_agrees_with_the_fake_quant_model(trained_resnet_fp8):
    """All-fp8 (e4m3) PTQ: every conv and the classifier on the fp8 tensor cores, activations e4m3 between them."""
    _check_agreement(*trained_resnet_fp8, "fp8")


def _check_agreement(fp32, model, qdq, x, y, precision: str) -> None:
    """Top-1 agreement with the fake-quant model >= 99.5% on the 9000 test images not used to calibrate, and
    accuracy within 0.5 points of fp32."""
    engine = build_engine(qdq, (500, 3, 32, 32), BuildOptions(opt_batch=500))
    rows = [r for r in engine.placement() if r.op_type in ("Conv2d", "Linear")]
    assert all(r.runs_as in (precision, "fused") for r in rows), [(r.layer, r.runs_as) for r in rows]
    agree = correct_engine = correct_fq = correct_fp32 = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(500), y.split(500), strict=True):
            xb = xb.cuda()
            out = engine.run_device(xb)
            ref = model(xb)
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            correct_engine += int((out.argmax(1).cpu() == yb).sum())
            correct_fq += int((ref.argmax(1).cpu() == yb).sum())
            correct_fp32 += int((fp32(xb).argmax(1).cpu() == yb).sum())
    n = len(y)
    assert agree / n >= 0.995, (agree / n, correct_engine / n, correct_fq / n)
    assert correct_engine / n >= correct_fp32 / n - 0.005, (correct_engine / n, correct_fp32 / n)


@pytest.fixture(scope="module")
def resnet_engine():
    torch.manual_seed(0)
    model = create_model("resnet18_cifar").eval()
    x = torch.randn(64, 3, 32, 32)
    mixq.prepare_(model, all_int8_config(model), mixq.PTQ(), example_input=x[:1])
    mixq.calibrate_(model, lambda m: m(x))
    qdq = export_qdq_onnx(mixq.deploy_model(model), (1, 3, 32, 32), mixq.export_calibration(model))
    return model, qdq, build_engine(qdq, (64, 3, 32, 32), BuildOptions(opt_batch=64))


def test_cuda_graph_replay_equals_the_eager_kernels(resnet_engine):
    """Every batch size gets its own graph; replays (interleaved across sizes, fresh inputs each time) give
    exactly what running the same kernels one by one gives."""
    _, _, engine = resnet_engine
    for batch in (1, 7, 64, 7, 1, 130):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        with torch.no_grad():
            eager = engine._forward(x).float()
        graphed = engine.run_device(x).float()
        assert torch.equal(eager, graphed), batch
    assert set(engine._graphs) == {1, 7, 64, 130}


def test_engine_file_keeps_the_tuned_kernels(resnet_engine, tmp_path):
    _, _, engine = resnet_engine
    path = engine.save(tmp_path / "r18.mixq")
    loaded = load_engine(path)
    assert loaded.backend == "cuda" and loaded.tuning == {}  # nothing tuned again on load
    assert [r.kernels for r in loaded.placement()] == [r.kernels for r in engine.placement()]
    x = torch.randn(16, 3, 32, 32)
    np.testing.assert_array_equal(engine.run(x).numpy(), loaded.run(x).numpy())


def test_profile_covers_every_conv(resnet_engine):
    _, qdq, engine = resnet_engine
    times = {t.layer: t.microseconds for t in engine.profile(torch.randn(64, 3, 32, 32), runs=5)}
    convs = [n for n, info in qdq.layers.items() if info["op_type"] == "Conv2d" and "shortcut" not in n]
    assert all(times.get(c, 0) > 0 for c in convs), times


def test_auto_on_a_cuda_model_includes_the_cuda_engines():
    torch.manual_seed(0)
    model = create_model("lenet").cuda().eval()
    config = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
    x = torch.randn(32, 1, 28, 28, device="cuda")
    mixq.prepare_(model, config, mixq.PTQ(), example_input=x[:1])
    mixq.calibrate_(model, lambda m: m(x))
    s = ModelSpeedup(model, (32, 1, 28, 28), batchsize=32).compress()
    names = {c.name for c in s.selection.candidates}
    assert {"cuda quantized", "cuda float", "cuda torch-fp16 float"} <= names, names  # + the strongest float
    times = {c.name: c.milliseconds for c in s.selection.candidates}
    assert times["cuda torch-fp16 float"] < times["cuda float"], times  # fp16 + graph vs the exact fp32 graph


def test_run_keeps_a_cuda_batch_on_the_gpu_and_stages_a_cpu_batch(resnet_engine):
    """A CUDA input: output on the same GPU, equal to the CPU-input path (pinned staging) bit for bit; repeated
    CPU calls reuse the staging buffer without corrupting a copy in flight; NaN is caught by the graph's flag."""
    model, _, engine = resnet_engine
    xs = [torch.randn(64, 3, 32, 32) for _ in range(3)]
    outs = [engine.run(x, check_finite=False) for x in xs]  # back to back: no wait between the staging copies
    for x, out in zip(xs, outs, strict=True):
        on_gpu = engine.run(x.cuda())
        assert on_gpu.is_cuda and on_gpu.dtype == torch.float32
        assert out.device.type == "cpu" and torch.equal(out, on_gpu.cpu())
    bad = xs[0].clone().cuda()
    bad[3, 1, 2, 2] = float("nan")
    with pytest.raises(EngineError, match="NaN"):
        engine.run(bad)
    with pytest.raises(EngineError, match="NaN"):
        engine.run(bad.cpu())
    speedup = ModelSpeedup(model, (64, 3, 32, 32), batchsize=64, backend="cuda")
    speedup.engine = engine
    out, seconds = speedup.inference(xs[1].cuda())
    assert out.is_cuda and seconds > 0 and torch.equal(out.cpu(), outs[1])


def test_backend_reports_unavailability_reason_only_without_gpu():
    assert CudaBackend().is_available()
