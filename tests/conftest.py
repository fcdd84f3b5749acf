from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    """The library's own default (MIXQ_DATA, shared/data beside the checkout, ~/.cache/mixq/data); no download."""
    from mixq import DataError
    from mixq.zoo.data import data_dir

    try:
        return data_dir(None, "mnist")
    except DataError:
        return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None or not (d / "mnist").is_dir():
        pytest.skip("real data not found: run `mixq download mnist cifar10` or set MIXQ_DATA (scripts/test.sh does)")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
