"""The download path against a local HTTP server on 127.0.0.1 (no outside network)."""

import hashlib
import io
import lzma
import tarfile
import threading
import typing
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mixq import DataError
from mixq.zoo.data import load_cifar10_arrays, load_mnist_arrays
from mixq.zoo.download import copy_dataset, download_cifar10, download_mnist, fetch


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves files with Range support; ``cut`` bytes: the first full request of a file is cut short."""

    cut: int | None = None
    served: typing.ClassVar[set] = set()
    requests: typing.ClassVar[list] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut and not rng and self.path not in self.served:
            self.served.add(self.path)
            self.wfile.write(body[: self.cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-file
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    RangeHandler.cut, RangeHandler.served, RangeHandler.requests = None, set(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_mnist_download_verifies_and_loads(server, data_dir, tmp_path):
    root, url = server
    for f in (data_dir / "mnist").iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    target = tmp_path / "data"
    download_mnist(target, mirrors=["http://127.0.0.1:9/", url])  # first mirror refuses: falls back
    x, y = load_mnist_arrays(train=False, root=target)
    assert x.shape == (10000, 28, 28) and y[:3].tolist() == [7, 2, 1]
    assert not list((target / "mnist").glob("*.part"))


def test_interrupted_download_resumes_with_range(server, tmp_path):
    root, url = server
    payload = bytes(range(256)) * 4000
    (root / "blob.bin").write_bytes(payload)
    RangeHandler.cut = 100_000
    target = tmp_path / "blob.bin"
    md5 = hashlib.md5(payload).hexdigest()
    with pytest.raises(DataError, match="interrupted at 100000 of 1024000 bytes; run again to resume"):
        fetch(url + "blob.bin", target, md5)
    assert not target.exists() and (tmp_path / "blob.bin.part").stat().st_size == 100_000
    fetch(url + "blob.bin", target, md5)
    assert target.read_bytes() == payload
    assert RangeHandler.requests[-1] == ("/blob.bin", "bytes=100000-")


def test_corrupted_download_is_rejected_and_removed(server, tmp_path):
    root, url = server
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(url + "t10k-labels-idx1-ubyte.gz", out / "x.gz", "ec29112dd5afa0611ce80d1b7f02629c")
    assert list(out.iterdir()) == []


def test_cifar10_archive_download_checks_every_batch(server, data_dir, tmp_path):
    root, url = server
    src = data_dir / "cifar10" / "cifar-10-batches-py"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
            data = lzma.decompress((src / f"{name}.xz").read_bytes())
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        meta = (src / "batches.meta").read_bytes()
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    (root / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    target = tmp_path / "data"
    download_cifar10(target, mirrors=[url])
    x, y = load_cifar10_arrays(train=False, root=target)
    assert y[:3].tolist() == [3, 8, 8] and x.shape == (10000, 3, 32, 32)


def test_file_mirror_and_copy_from_a_data_directory(data_dir, tmp_path):
    """Offline copies: a file:// mirror of the official MNIST files, and a copy of another data directory (the
    CIFAR-10 batches as they are there, .xz), each file checked; a corrupted source file is refused."""
    target = tmp_path / "data"
    download_mnist(target, mirrors=[(data_dir / "mnist").as_uri() + "/"])
    assert load_mnist_arrays(train=False, root=target)[1][:3].tolist() == [7, 2, 1]
    copy_dataset("cifar10", data_dir, target)
    assert load_cifar10_arrays(train=False, root=target)[1][:3].tolist() == [3, 8, 8]
    bad = tmp_path / "bad" / "mnist"
    bad.mkdir(parents=True)
    for f in (data_dir / "mnist").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        copy_dataset("mnist", bad.parent, tmp_path / "other")
    assert not (tmp_path / "other" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
