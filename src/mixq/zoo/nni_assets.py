"""Stand-in for the tutorial's ``nni_assets.compression.mnist_model``: ``TorchModel``, ``device``, ``trainer``,
``evaluator`` with the same signatures, on real MNIST from ``$MIXQ_DATA``. ``device`` is the CPU (the
default backend is ONNX Runtime on CPU)."""

from __future__ import annotations

import torch

from .models import TorchModel
from .tutorial import MnistTask
from .tutorial import evaluator as _evaluate
from .tutorial import trainer as _train

__all__ = ["TorchModel", "device", "trainer", "evaluator", "test_trt"]

device = torch.device("cpu")
_state: dict = {"task": None, "epoch": 0}


def _task() -> MnistTask:
    if _state["task"] is None:
        _state["task"] = MnistTask()
    return _state["task"]


def trainer(model, optimizer, criterion) -> None:
    """One epoch over the 60k training images, batch 128, shuffled."""
    _train(model, optimizer, criterion, _task().train_loader(_state["epoch"]))
    _state["epoch"] += 1


def evaluator(model) -> float:
    """Accuracy (%) on the 10k test images, printed as the tutorial does."""
    task = _task()
    loss, acc = _evaluate(model, task.test_loader())
    n = len(task.test_set)
    print(f"Average test loss: {loss:.4f}, Accuracy: {round(acc * n / 100)}/{n} ({acc:.0f}%)")
    return acc


def test_trt(engine) -> tuple[float, float]:
    """The tutorial's ``test_trt``: accuracy and inference time of an engine over the test set.
    Returns (accuracy %, seconds per sample)."""
    import torch.nn.functional as F

    task = _task()
    loss, correct, seconds, n = 0.0, 0, 0.0, 0
    for data, target in task.test_loader():
        output, t = engine.inference(data)
        loss += float(F.nll_loss(output, target, reduction="sum"))
        correct += int((output.argmax(1) == target).sum())
        seconds += t
        n += len(target)
    print(f"Loss: {loss / n:.4f}  Accuracy: {100 * correct / n:.2f}%")
    print(f"Inference elapsed_time (whole dataset): {seconds:.4f}s, per sample: {seconds / n:.3e}s")
    return 100.0 * correct / n, seconds / n
