"""The NNI tutorial's quantization half, unchanged except for the import, on real MNIST."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.optim import SGD

import mixq
from mixq.nni import QAT_Quantizer
from mixq.zoo.models import TorchModel
from mixq.zoo.tutorial import TUTORIAL_CONFIG_LIST, MnistTask, evaluator, trainer


@pytest.mark.slow
def test_tutorial_qat_on_real_mnist_reaches_accuracy(data_dir, tmp_path):
    task = MnistTask(data_dir)
    torch.manual_seed(0)
    model = TorchModel()
    fp32 = copy.deepcopy(model)
    fp32_optimizer = SGD(fp32.parameters(), lr=0.01, momentum=0.5)
    trainer(fp32, fp32_optimizer, F.nll_loss, task.train_loader(0))
    _, fp32_acc = evaluator(fp32, task.test_loader())

    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.5)
    dummy_input = torch.rand(32, 1, 28, 28)
    quantizer = QAT_Quantizer(model, TUTORIAL_CONFIG_LIST, optimizer, dummy_input)
    quantizer.compress()
    trainer(model, optimizer, F.nll_loss, task.train_loader(0))
    _, acc = evaluator(model, task.test_loader())
    # One epoch (469 SGD steps) from the same initial weights; the NNI tutorial printed 90% after its first
    # epoch. Measured here (seed 0): fp32 91.0%, QAT 88.0%; QAT lags in the first epoch while its EMA ranges
    # settle and catches up by epoch 3 (96.95% vs 96.58%, see the issue note / README).
    assert acc >= 85.0, acc
    assert acc >= fp32_acc - 4.0, (acc, fp32_acc)
    calibration_config = quantizer.export_model(tmp_path / "mnist_model.pth", tmp_path / "mnist_calibration.pth")
    assert calibration_config == mixq.load_calibration_config(tmp_path / "mnist_calibration.pth")
    assert calibration_config["relu1"]["tracked_min_output"] == 0.0
    assert calibration_config["relu1"]["tracked_max_output"] > 0.5
