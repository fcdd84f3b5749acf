"""Trained weights kept in the repository's ``weights/`` folder (or ``$MIXQ_WEIGHTS``) for benchmarks and tests.

``resnet18_cifar``: CIFAR-10 ResNet-18 trained on all 50k training images by ``benchmarks/train_cifar.py``
(log and accuracies: ``benchmarks/results/train-cifar/``), stored as an fp16 state dict split into parts under
16 MiB. The parts are joined and checked against a SHA-256 before loading.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from torch import nn

from .._errors import DataError
from .models import create_model

__all__ = ["PRETRAINED", "weights_dir", "load_pretrained"]

# name -> (file prefix, number of parts, sha256 of the joined parts)
PRETRAINED = {
    "resnet18_cifar": ("resnet18_cifar.fp16.pt", 2, "d92fa0488bf55271d41e7d22da0e0365ff98a56d294501fb7e7acad733339bd5"),
}


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$MIXQ_WEIGHTS``, else the repository's ``weights/`` folder."""
    if path is not None:
        return Path(path)
    if os.environ.get("MIXQ_WEIGHTS"):
        return Path(os.environ["MIXQ_WEIGHTS"])
    return Path(__file__).resolve().parents[3] / "weights"


def load_pretrained(name: str, root: str | os.PathLike | None = None) -> nn.Module:
    """The registered model ``name`` with its trained weights, in fp32, eval mode."""
    if name not in PRETRAINED:
        raise DataError(f"no trained weights for {name!r}; available: {', '.join(PRETRAINED)}")
    prefix, parts, sha256 = PRETRAINED[name]
    folder = weights_dir(root)
    paths = [folder / f"{prefix}.{i:02d}" for i in range(parts)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"trained weights for {name!r} not found: {', '.join(missing)} (set MIXQ_WEIGHTS)")
    data = b"".join(p.read_bytes() for p in paths)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"trained weights for {name!r} in {folder}: checksum mismatch (corrupt or partial files)")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = create_model(name)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
