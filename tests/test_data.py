import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixq import DataError
from mixq.zoo import data
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


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """No MIXQ_DATA, no shared/data beside the checkout, an empty user cache under tmp_path."""
    monkeypatch.delenv("MIXQ_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_checkout_root", lambda: None)
    return tmp_path / "cache" / "mixq" / "data"


def test_missing_data_names_where_it_looked_and_the_command(no_default_data, tmp_path):
    with pytest.raises(DataError, match=r"no mnist data found .*MIXQ_DATA.*run `mixq download mnist`") as e:
        load_mnist_arrays(train=False)
    assert str(no_default_data) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_mnist_arrays(train=False, root=tmp_path / "nope")
    with pytest.raises(DataError, match=r"holds no complete mnist data set .*run `mixq download mnist --data-dir"):
        load_mnist_arrays(train=False, root=tmp_path)


def test_a_given_folder_without_the_data_names_what_is_missing_and_the_command(data_dir, tmp_path, monkeypatch):
    """An existing but empty or half-filled --data-dir / MIXQ_DATA is refused at lookup, in the same one line as
    the other not-found paths (folder, what is missing, the download command), not later as a bare missing file."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        data.data_dir(empty, "mnist")
    assert str(e.value) == (
        f"data directory {empty} holds no complete mnist data set (missing mnist/train-images-idx3-ubyte.gz and 3 "
        f"more): run `mixq download mnist --data-dir {empty}`, or pass a folder holding mnist/"
    )
    partial = tmp_path / "partial"
    (partial / "mnist").mkdir(parents=True)
    for f in (data_dir / "mnist").iterdir():
        if f.name != "t10k-labels-idx1-ubyte.gz":
            shutil.copy(f, partial / "mnist" / f.name)
    assert data.missing_files(partial, "mnist") == ["mnist/t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(DataError, match=r"missing mnist/t10k-labels-idx1-ubyte.gz\):") as e:
        load_mnist_arrays(train=True, root=partial)  # the training files are there: still refused, before reading
    assert "\n" not in str(e.value)
    monkeypatch.setenv("MIXQ_DATA", str(empty))
    with pytest.raises(DataError) as e:
        data.data_dir(None, "cifar10")
    assert str(e.value).startswith(f"data directory MIXQ_DATA={empty} holds no complete cifar10 data set (missing ")
    assert f"run `mixq download cifar10 --data-dir {empty}`, or set MIXQ_DATA to a folder" in str(e.value)
    assert data.data_dir(data_dir, "cifar10") == data_dir  # the real folder (xz batches) is still taken


def test_default_order_env_then_shared_data_then_cache(data_dir, no_default_data, tmp_path, monkeypatch):
    cache = no_default_data
    (cache / "mnist").mkdir(parents=True)
    with pytest.raises(DataError, match="no mnist data"):  # a folder a failed download left is not the data
        data.data_dir(None, "mnist")
    for f in (data_dir / "mnist").iterdir():
        shutil.copy(f, cache / "mnist" / f.name)
    assert data.data_dir(None, "mnist") == cache
    assert load_mnist_arrays(train=False)[1][:3].tolist() == [7, 2, 1]
    with pytest.raises(DataError, match="no cifar10 data"):
        data.data_dir(None, "cifar10")
    checkout = tmp_path / "work" / "clone"  # shared/data in a folder above the checkout comes before the cache
    (tmp_path / "work" / "shared" / "data" / "mnist").mkdir(parents=True)
    for f in (data_dir / "mnist").iterdir():
        shutil.copy(f, tmp_path / "work" / "shared" / "data" / "mnist" / f.name)
    monkeypatch.setattr(data, "_checkout_root", lambda: checkout)
    assert data.data_dir(None, "mnist") == tmp_path / "work" / "shared" / "data"
    monkeypatch.setenv("MIXQ_DATA", str(data_dir))
    assert data.data_dir(None, "mnist") == data_dir
    monkeypatch.setenv("MIXQ_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="MIXQ_DATA=.*gone does not exist"):
        data.data_dir(None, "mnist")


def test_user_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.user_cache_dir() == tmp_path / "mixq" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.user_cache_dir() == Path.home() / ".cache" / "mixq" / "data"
