"""Download MNIST / CIFAR-10 from the usual mirrors into a data directory: resumable (HTTP Range), atomic
(``.part`` files renamed only after the checksum matched) and checksum-verified against the official values.
A mirror may be any URL urllib opens, ``file://`` included (an offline copy of the official files);
:func:`copy_dataset` takes the files from another mixq data directory instead (a share, a colleague's copy)."""

from __future__ import annotations

import hashlib
import lzma
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .._errors import DataError
from .._io import atomic_write
from .data import CIFAR10_FILES, MNIST_FILES, _read_verified

__all__ = [
    "MNIST_MIRRORS",
    "CIFAR10_MIRRORS",
    "download",
    "download_mnist",
    "download_cifar10",
    "copy_dataset",
    "fetch",
]

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CHUNK = 1 << 16


def fetch(url: str, target: Path, md5: str | None = None, timeout: float = 30.0, progress=None) -> Path:
    """Download ``url`` to ``target``; continue a previous ``target.part`` with a Range request; verify the
    md5 of the whole file before renaming it into place."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        expected = (have if resumed else 0) + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
    if expected is not None and size < expected:
        raise DataError(f"{url}: download interrupted at {size} of {expected} bytes; run again to resume")
    if md5 is not None:
        digest = hashlib.md5(part.read_bytes()).hexdigest()
        if digest != md5:
            part.unlink()
            raise DataError(f"{url}: checksum mismatch (md5 {digest}, expected {md5}); the partial file was removed")
    os.replace(part, target)
    return target


def _try_mirrors(name: str, mirrors: Sequence[str], target: Path, md5: str | None, progress) -> Path:
    errors = []
    for mirror in mirrors:
        try:
            return fetch(mirror.rstrip("/") + "/" + name, target, md5, progress=progress)
        except (urllib.error.URLError, OSError, DataError) as e:
            errors.append(f"{mirror}: {e}")
    raise DataError(f"could not download {name}: " + "; ".join(errors))


def download_mnist(root: str | os.PathLike, mirrors: Sequence[str] = MNIST_MIRRORS, progress=None) -> Path:
    """The four official MNIST files into ``root/mnist`` (files already present and valid are kept)."""
    d = Path(root) / "mnist"
    for name, md5 in MNIST_FILES.items():
        target = d / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        _try_mirrors(name, mirrors, target, md5, progress)
    return d


def download_cifar10(
    root: str | os.PathLike, mirrors: Sequence[str] = CIFAR10_MIRRORS, archive_md5: str | None = None, progress=None
) -> Path:
    """The official python batches into ``root/cifar10/cifar-10-batches-py``. Each extracted batch is checked
    against its official md5 (so a re-packed archive from another mirror is accepted only if its content is
    identical); the archive itself is checked too when ``archive_md5`` is given."""
    d = Path(root) / "cifar10" / "cifar-10-batches-py"
    if all((d / n).is_file() or (d / f"{n}.xz").is_file() for n in CIFAR10_FILES):
        return d
    archive = Path(root) / "cifar10" / CIFAR10_ARCHIVE
    if not archive.is_file():
        _try_mirrors(CIFAR10_ARCHIVE, mirrors, archive, archive_md5, progress)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in [*CIFAR10_FILES, "batches.meta"]:
                if name not in members:
                    raise DataError(f"{archive}: no {name} inside the archive")
                data = tar.extractfile(members[name]).read()
                if name in CIFAR10_FILES and hashlib.md5(data).hexdigest() != CIFAR10_FILES[name]:
                    raise DataError(f"{archive}: {name} fails its official checksum")
                with atomic_write(d / name, "wb") as f:
                    f.write(data)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: cannot extract ({e}); delete it to download again") from e
    return d


def download(name: str, root: str | os.PathLike, mirrors: Sequence[str] | None = None, progress=None) -> Path:
    """``download_mnist`` or ``download_cifar10`` by data set name, from ``mirrors`` (default: the usual ones)."""
    if name == "mnist":
        return download_mnist(root, mirrors or MNIST_MIRRORS, progress)
    if name == "cifar10":
        return download_cifar10(root, mirrors or CIFAR10_MIRRORS, progress=progress)
    raise DataError(f"unknown data set {name!r}: mnist or cifar10")


def copy_dataset(name: str, source: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Copy data set ``name`` from the data directory ``source`` (holding ``mnist/`` or ``cifar10/`` in mixq's
    layout) into ``root``, each file checked against its official checksum first (CIFAR-10 batches as they are,
    plain or .xz) and written atomically. Files already in ``root`` are replaced."""
    src, dst = Path(source), Path(root)
    if name == "mnist":
        for file, md5 in MNIST_FILES.items():
            data = _read_verified(src / "mnist" / file, md5)
            with atomic_write(dst / "mnist" / file, "wb") as f:
                f.write(data)
        return dst / "mnist"
    if name != "cifar10":
        raise DataError(f"unknown data set {name!r}: mnist or cifar10")
    d_src = src / "cifar10" / "cifar-10-batches-py"
    d_dst = dst / "cifar10" / "cifar-10-batches-py"
    for file, md5 in CIFAR10_FILES.items():
        plain, xz = d_src / file, d_src / f"{file}.xz"
        path = plain if plain.is_file() or not xz.is_file() else xz
        _read_verified(path, md5, lzma.decompress if path is xz else None)
        with atomic_write(d_dst / path.name, "wb") as f:
            f.write(path.read_bytes())
    if (d_src / "batches.meta").is_file():
        with atomic_write(d_dst / "batches.meta", "wb") as f:
            f.write((d_src / "batches.meta").read_bytes())
    return d_dst
