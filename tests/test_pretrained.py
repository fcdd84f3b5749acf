"""The committed trained ResNet-18 loads, is checked, and classifies real CIFAR-10 test images."""

import shutil

import pytest
import torch

from mixq._errors import DataError
from mixq.zoo.data import load_cifar10
from mixq.zoo.pretrained import PRETRAINED, load_pretrained


def test_trained_resnet18_classifies_real_cifar(data_dir):
    model = load_pretrained("resnet18_cifar")
    test = load_cifar10(False, data_dir, limit=1000)
    with torch.no_grad():
        acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    # benchmarks/results/train-cifar: 94.62% on all 10k; a broken load (wrong keys, no BN stats) gives ~10%
    assert acc > 0.9


def test_corrupt_or_missing_parts_are_named(tmp_path):
    prefix, parts, _ = PRETRAINED["resnet18_cifar"]
    with pytest.raises(DataError, match="not found"):
        load_pretrained("resnet18_cifar", tmp_path)
    from mixq.zoo.pretrained import weights_dir

    for i in range(parts):
        shutil.copy(weights_dir() / f"{prefix}.{i:02d}", tmp_path)
    last = tmp_path / f"{prefix}.{parts - 1:02d}"
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(DataError, match="checksum mismatch"):
        load_pretrained("resnet18_cifar", tmp_path)
    with pytest.raises(DataError, match="no trained weights"):
        load_pretrained("lenet")
