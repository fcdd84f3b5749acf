"""TensorRT engine build and run: needs TensorRT 10+ and a GPU (skipped elsewhere: see README)."""

import pytest

from engine_cases import check_fp32_parity, check_int8_parity, qat_lenet

tensorrt = pytest.importorskip("tensorrt")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)


def test_tensorrt_int8_parity_on_real_mnist(data_dir):
    model, _, task = qat_lenet(data_dir)
    r = check_int8_parity("tensorrt", model, task)
    assert r["agreement"] >= 0.995, r
    assert r["min_sqnr_db"] > 35, r


def test_tensorrt_fp32_parity():
    assert check_fp32_parity("tensorrt") < 1e-4
