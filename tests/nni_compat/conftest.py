import pytest

from mixq.nni import reset_quant_scheme_dtype


@pytest.fixture(autouse=True)
def _nni_settings_reset():
    """set_quant_scheme_dtype is process-wide, as in NNI: every test starts and ends with the defaults."""
    reset_quant_scheme_dtype()
    yield
    reset_quant_scheme_dtype()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working directory: NNI's speedup writes default_model.onnx / calibration.cache there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
