import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    env = os.environ.get("MIXQ_DATA")
    if env:
        return Path(env)
    default = REPO.parent / "shared" / "data"
    return default if default.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None or not (d / "mnist").is_dir():
        pytest.skip("real data not found: set MIXQ_DATA to the folder holding mnist/ and cifar10/")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
