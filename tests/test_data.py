import gzip
import shutil

import numpy as np
import pytest

from mixq import DataError
from mixq.zoo.data import load_cifar10_arrays, load_mnist, load_mnist_arrays


def test_mnist_real_files(data_dir):
    x, y = load_mnist_arrays(train=False, root=data_dir)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    ds = load_mnist(train=True, root=data_dir, limit=1000)
    assert len(ds) == 1000 and tuple(ds[0][0].shape) == (1, 28, 28)
    assert abs(float(ds.tensors[0].mean())) < 0.2  # normalised


def test_cifar10_test_batch(data_dir):
    x, y = load_cifar10_arrays(train=False, root=data_dir)
    assert x.shape == (10000, 3, 32, 32)
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert x[0, :, 0, 0].tolist() == [158, 112, 49]


def test_corrupted_file_fails_checksum_naming_it(data_dir, tmp_path):
    (tmp_path / "mnist").mkdir()
    for f in (data_dir / "mnist").iterdir():
        shutil.copy(f, tmp_path / "mnist" / f.name)
    bad = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[100] ^= 1
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        load_mnist_arrays(train=False, root=tmp_path)


def test_missing_data_dir_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXQ_DATA", raising=False)
    with pytest.raises(DataError, match="MIXQ_DATA"):
        load_mnist_arrays(train=False)
    with pytest.raises(DataError, match="does not exist"):
        load_mnist_arrays(train=False, root=tmp_path / "nope")
    with pytest.raises(DataError, match="file not found"):
        load_mnist_arrays(train=False, root=tmp_path)
