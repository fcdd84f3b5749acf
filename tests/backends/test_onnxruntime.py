import pytest
import torch

from engine_cases import check_fp32_parity, check_int8_parity, qat_lenet


@pytest.fixture(scope="module")
def trained(data_dir):
    return qat_lenet(data_dir)


def test_int8_engine_matches_fake_quant_model_on_real_mnist(trained):
    model, _, task = trained
    r = check_int8_parity("onnxruntime", model, task)
    assert r["images"] == 10_000
    # Measured (AVX2 CPU, ORT 1.32): agreement 99.95%, SQNR 43.8 dB, p99.9 5.3 steps, max 8.2 steps.
    # ORT's integer kernels requantize with an int32 bias and one float multiplier where the fake-quant model
    # computes in float; values within a hair of a rounding tie land one step apart, and such single-step
    # flips in conv1/conv2 outputs cascade into a few steps at the logits (ORT without graph optimizations,
    # which executes the Q/DQ graph literally, agrees to 0.1 step at p99.9).
    assert r["agreement"] >= 0.995, r
    assert r["min_sqnr_db"] > 35, r
    assert r["p999_error_steps"] <= 6, r
    assert r["max_error_steps"] <= 10, r
    assert r["random_max_error_steps"] <= 10, r


def test_fp32_engine_matches_pytorch():
    assert check_fp32_parity("onnxruntime") < 1e-5


def test_qat_lenet_is_accurate(trained):
    model, _, task = trained
    x, y = task.test_set.tensors
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.95, acc
