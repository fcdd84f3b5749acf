import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU every Triton kernel of the suite runs in Triton's interpreter. Set before any module
    # imports triton: a kernel module first imported in compiled mode (torch.compile imports triton too) cannot
    # be interpreted later in the same process, which made the cuda engine tests depend on the test order.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    gpu_dir = REPO / "tests" / "gpu"
    for item in items:
        if gpu_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)


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
