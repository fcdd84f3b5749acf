"""MNIST and CIFAR-10 as torch Datasets, read from the official files in a data directory.

The data directory is the ``data_dir`` argument, else the ``MIXQ_DATA`` environment variable, else the first of
:func:`default_data_dirs` that holds the data set: ``shared/data`` beside a source checkout or one of its parent
folders (the project's layout), then the user cache folder ``$XDG_CACHE_HOME/mixq/data`` (``~/.cache/mixq/data``),
where ``mixq download`` writes by default. Layout: ``<data_dir>/mnist/*-ubyte.gz`` (the official gzip files) and
``<data_dir>/cifar10/cifar-10-batches-py/`` holding the official batches, either plain or xz-compressed
(``data_batch_1`` or ``data_batch_1.xz``). Every file is checked against its official checksum before use.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import pickle
import shlex
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .._errors import DataError

__all__ = [
    "data_dir",
    "default_data_dirs",
    "user_cache_dir",
    "holds",
    "missing_files",
    "load_tensor_file",
    "load_labelled_file",
    "load_image_folder",
    "ImageTransform",
    "DATASETS",
    "load_mnist",
    "load_cifar10",
    "MNIST_FILES",
    "CIFAR10_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# Official MD5 values (torchvision's resource lists).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# MD5 of the decompressed official batches.
CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


# The folder of each data set inside a data directory.
DATASETS = {"mnist": "mnist", "cifar10": "cifar10"}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mixq/data``, else ``~/.cache/mixq/data``: where ``mixq download`` writes by default."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixq" / "data"


def _checkout_root() -> Path | None:
    """The repository root when mixq runs from a source checkout (``src/mixq/zoo/data.py``), else None."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "mixq").is_dir() else None


def default_data_dirs() -> list[Path]:
    """Where data is looked for when neither ``data_dir`` nor ``MIXQ_DATA`` is given, in order: ``shared/data``
    in the parent folder of a source checkout or any folder above it, then :func:`user_cache_dir`."""
    found = []
    root = _checkout_root()
    if root is not None:
        found += [parent / "shared" / "data" for parent in root.parents]
    return [*found, user_cache_dir()]


def data_dir(path: str | os.PathLike | None = None, dataset: str | None = None) -> Path:
    """``path``, else ``$MIXQ_DATA``, else the first of :func:`default_data_dirs` holding ``dataset`` (``mnist`` or
    ``cifar10``; any of the two when None). A given folder must hold the data set too (an empty folder or one a
    failed download left is not the data). The error says where it looked, what is missing and the command that
    fetches the data."""
    wanted = [dataset] if dataset else list(DATASETS)
    if path is not None or os.environ.get("MIXQ_DATA"):
        p = Path(path if path is not None else os.environ["MIXQ_DATA"])
        origin = "" if path is not None else "MIXQ_DATA="
        if not p.is_dir():
            raise DataError(f"data directory {origin}{p} does not exist")
        if not any(holds(p, name) for name in wanted):
            raise DataError(_incomplete_data_message(p, origin, wanted))
        return p
    for candidate in default_data_dirs():
        if any(holds(candidate, name) for name in wanted):
            return candidate
    raise DataError(missing_data_message(dataset))


def missing_files(root: str | os.PathLike, dataset: str) -> list[str]:
    """The files of ``dataset`` that ``root`` lacks, relative to ``root`` (by name; checksums are checked when they
    are read). A CIFAR-10 batch counts as present plain or xz-compressed."""
    d = Path(root) / DATASETS[dataset]
    if dataset == "mnist":
        return [f"{DATASETS[dataset]}/{name}" for name in MNIST_FILES if not (d / name).is_file()]
    d = d / "cifar-10-batches-py"
    return [
        f"{DATASETS[dataset]}/cifar-10-batches-py/{name}"
        for name in CIFAR10_FILES
        if not ((d / name).is_file() or (d / f"{name}.xz").is_file())
    ]


def holds(root: str | os.PathLike, dataset: str) -> bool:
    """Whether ``root`` has every file of ``dataset`` (:func:`missing_files` is empty), so that a folder a failed
    download left behind is not taken for the data."""
    return not missing_files(root, dataset)


def _incomplete_data_message(root: Path, origin: str, names: list[str]) -> str:
    """One line for a given data directory lacking the data set: the folder, the first missing file (and how many
    more), and the command that downloads into that folder."""
    missing = [f for name in names for f in missing_files(root, name)]
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    command = f"mixq download {' '.join(names)} --data-dir {shlex.quote(str(root))}"
    return (
        f"data directory {origin}{root} holds no complete {' or '.join(names)} data set (missing {missing[0]}{more}): "
        f"run `{command}`, or {'set MIXQ_DATA to' if origin else 'pass'} a folder holding "
        f"{' and '.join(f'{DATASETS[n]}/' for n in names)}"
    )


def missing_data_message(dataset: str | None) -> str:
    """One line: no data found, where mixq looked, and the exact command that gets it."""
    names = [dataset] if dataset else list(DATASETS)
    folders = " and ".join(f"{DATASETS[n]}/" for n in names)
    cache = user_cache_dir()
    return (
        f"no {' or '.join(names)} data found (MIXQ_DATA is not set; looked in shared/data beside the checkout and in "
        f"{cache}): run `mixq download {' '.join(names)}` (writes {cache}), or set MIXQ_DATA to a folder holding "
        f"{folders}"
    )


def _read_verified(path: Path, md5: str, decompress=None) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    data = decompress(raw) if decompress else raw
    digest = hashlib.md5(data).hexdigest()
    if digest != md5:
        raise DataError(
            f"{path}: checksum mismatch (md5 {digest}, expected {md5}); the file is corrupted or not the official one"
        )
    return data


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_arrays(train: bool, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the official gzip files, checksum-verified."""
    d = data_dir(root, "mnist") / "mnist"
    prefix = "train" if train else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        arrays.append(_parse_idx(gzip.decompress(_read_verified(d / name, MNIST_FILES[name])), name))
    return arrays[0], arrays[1]


def load_mnist(train: bool, root: str | os.PathLike | None = None, limit: int | None = None) -> TensorDataset:
    """MNIST as a TensorDataset of normalized float images [N, 1, 28, 28] and int64 labels."""
    images, labels = load_mnist_arrays(train, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MNIST_MEAN) / MNIST_STD
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_cifar10_arrays(
    train: bool, root: str | os.PathLike | None = None, train_batches: tuple[int, ...] = (1, 2, 3, 4, 5)
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]); reads plain or .xz batches, checksum-verified.
    ``train_batches`` picks which of the five official training batches to read (10k images each)."""
    d = data_dir(root, "cifar10") / "cifar10" / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in train_batches] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        plain, xz = d / name, d / f"{name}.xz"
        if plain.is_file():
            data = _read_verified(plain, CIFAR10_FILES[name])
        else:
            data = _read_verified(xz, CIFAR10_FILES[name], lzma.decompress)
        batch = _unpickle_cifar(data, name)
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class _CifarUnpickler(pickle.Unpickler):
    """Only numpy's array reconstruction is allowed: the batches hold a dict, lists and one ndarray."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 renamed numpy.core
            return super().find_class(module, name)


def _unpickle_cifar(data: bytes, name: str) -> dict:
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{name}: cannot parse CIFAR-10 batch ({e})") from e


def load_cifar10(
    train: bool,
    root: str | os.PathLike | None = None,
    limit: int | None = None,
    train_batches: tuple[int, ...] = (1, 2, 3, 4, 5),
) -> TensorDataset:
    """CIFAR-10 as a TensorDataset of normalized float images [N, 3, 32, 32] and int64 labels."""
    images, labels = load_cifar10_arrays(train, root, train_batches)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).reshape(1, 3, 1, 1)
    return TensorDataset((x - mean) / std, torch.from_numpy(labels))


# --- the user's own data: tensors in a file --------------------------------------------------------------

OWN_DATA_SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def load_tensor_file(path: str | os.PathLike) -> torch.Tensor:
    """Model inputs from a file: a float array/tensor ``[N, ...one sample's shape]`` in ``.npy`` (read without
    pickle) or ``.pt``/``.pth`` (``torch.save(tensor)``, read with ``weights_only=True``); a labelled file (see
    :func:`load_labelled_file`) gives its images. Normalize the inputs the way the model was trained: they are
    fed to the model as they are."""
    data = _read_own(Path(path))
    images = data[0] if isinstance(data, tuple) else data
    return _checked_inputs(images, Path(path))


def load_labelled_file(path: str | os.PathLike) -> TensorDataset:
    """``(images, labels)`` from ``.npz`` (arrays ``images`` and ``labels``), or ``.pt``/``.pth`` holding a dict
    with those keys or a tuple ``(images, labels)``; labels are class indices ``[N]``."""
    p = Path(path)
    data = _read_own(p)
    if not isinstance(data, tuple):
        raise DataError(
            f"{p}: holds inputs only ({_shape_of(data)}); labelled data is an .npz with arrays 'images' and "
            "'labels', or a .pt/.pth of {'images': tensor, 'labels': tensor} or (images, labels)"
        )
    images, labels = _checked_inputs(data[0], p), data[1]
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise DataError(f"{p}: labels must be integer class indices of shape [N], got {_shape_of(labels)}")
    if len(labels) != len(images):
        raise DataError(f"{p}: {len(images)} images but {len(labels)} labels")
    return TensorDataset(images, labels.long())


def _shape_of(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _read_own(p: Path) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A tensor, or (images, labels) for a labelled file; errors name the file and what it holds."""
    if p.suffix not in OWN_DATA_SUFFIXES:
        raise DataError(f"{p}: expected a {', '.join(OWN_DATA_SUFFIXES)} file of tensors")
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        if p.suffix in (".npy", ".npz"):
            loaded = np.load(p, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return torch.from_numpy(np.ascontiguousarray(loaded))
            with loaded:
                keys = set(loaded.files)
                if not {"images", "labels"} <= keys:
                    raise DataError(f"{p}: an .npz needs arrays 'images' and 'labels', found {sorted(keys)}")
                return torch.from_numpy(loaded["images"]), torch.from_numpy(loaded["labels"])
        loaded = torch.load(p, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as e:  # numpy/torch raise many kinds for a damaged or pickled file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{p}: cannot read tensors ({first[:120]})") from None
    if isinstance(loaded, torch.Tensor):
        return loaded
    if isinstance(loaded, dict) and {"images", "labels"} <= set(loaded):
        loaded = (loaded["images"], loaded["labels"])
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2 and all(isinstance(t, torch.Tensor) for t in loaded):
        return loaded[0], loaded[1]
    kind = f"a dict with keys {sorted(map(str, loaded))[:4]}" if isinstance(loaded, dict) else type(loaded).__name__
    raise DataError(f"{p}: holds {kind}; expected a tensor, (images, labels) or {{'images': ..., 'labels': ...}}")


def _checked_inputs(images: torch.Tensor, p: Path) -> torch.Tensor:
    if not images.dtype.is_floating_point:
        raise DataError(
            f"{p}: inputs are {_shape_of(images)}; the model takes float inputs: convert and normalize them the way "
            "it was trained first"
        )
    if images.dim() < 2 or len(images) == 0:
        raise DataError(f"{p}: inputs must be [N, ...one sample's shape] with N >= 1, got {_shape_of(images)}")
    if not torch.isfinite(images).all():
        raise DataError(f"{p}: inputs hold NaN or inf")
    return images.float()


# --- the user's own data: a folder of images -------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageTransform:
    """How image files become model inputs: converted to ``mode`` (``RGB`` or ``L``, gray), resized to ``size``
    (height, width; None: as they are, then every image must have one size), scaled to [0, 1], then
    ``(x - mean) / std`` per channel (one value: every channel). Written on the command line as
    ``size=32x32;mode=RGB;mean=0.4914,0.4822,0.4465;std=0.247,0.243,0.261``."""

    size: tuple[int, int] | None = None
    mode: str = "RGB"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.mode not in ("RGB", "L"):
            raise DataError(f"transform mode must be RGB or L, got {self.mode!r}")
        channels = 3 if self.mode == "RGB" else 1
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, channels):
                raise DataError(f"transform {key}: {len(values)} values for {channels} channel(s) of mode {self.mode}")
        if any(v <= 0 for v in self.std):
            raise DataError(f"transform std must be > 0, got {list(self.std)}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise DataError(f"transform size must be HxW with H, W >= 1, got {self.size}")

    @classmethod
    def parse(cls, text: str | None) -> ImageTransform:
        """From ``key=value;...`` with keys size, mode, mean, std (all optional)."""
        fields: dict = {}
        for part in filter(None, (p.strip() for p in (text or "").split(";"))):
            key, sep, value = part.partition("=")
            key = key.strip()
            try:
                if not sep or key not in ("size", "mode", "mean", "std"):
                    raise ValueError
                if key == "size":
                    fields["size"] = tuple(int(v) for v in value.lower().split("x"))
                elif key == "mode":
                    fields["mode"] = value.strip()
                else:
                    fields[key] = tuple(float(v) for v in value.split(","))
            except ValueError:
                raise DataError(
                    f"transform {part!r}: expected size=HxW, mode=RGB|L, mean=a[,b,c] or std=a[,b,c], separated by ';'"
                ) from None
        return cls(**fields)


def load_image_folder(
    path: str | os.PathLike, transform: ImageTransform = ImageTransform(), limit: int | None = None
) -> torch.Tensor:
    """The images under ``path`` (any depth, sorted by path; at most ``limit``) as a float tensor
    ``[N, C, H, W]`` through ``transform``. Needs Pillow (a dependency of matplotlib)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{root}: reading image folders needs Pillow (pip install pillow)") from None
    files = files[:limit] if limit else files
    mean = torch.tensor(transform.mean).reshape(-1, 1, 1)
    std = torch.tensor(transform.std).reshape(-1, 1, 1)
    out, first = [], None
    for f in files:
        try:
            with Image.open(f) as image:
                image = image.convert(transform.mode)
                if transform.size is not None:
                    image = image.resize((transform.size[1], transform.size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read as an image ({e})") from None
        x = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)
        if first is None:
            first = (f, tuple(x.shape))
        elif tuple(x.shape) != first[1]:
            raise DataError(
                f"{f}: {list(x.shape[1:])} pixels, but {first[0].name} has {list(first[1][1:])}; "
                "give the transform a size=HxW"
            )
        out.append((x - mean) / std)
    return torch.stack(out)
