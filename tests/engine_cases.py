"""Test bodies shared by the CPU (ONNX Runtime) and GPU (TensorRT) engine tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.nni import QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.zoo.models import TorchModel
from mixq.zoo.tutorial import MnistTask, trainer

ALL8_WITH_LOGITS = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_names": ["fc3"]},  # logits on an int8 grid
]


TUTORIAL_STYLE = [  # NNI's tutorial style: conv/linear inputs and weights, ReLU outputs; conv outputs float
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def randomize_batchnorm(model: torch.nn.Module, weight_low: float = 0.5) -> None:
    """BatchNorm statistics and affine factors that are not the identity (uniform in fixed ranges, from torch's
    global generator), so a BN fold has something to fold; ``weight_low < 0`` adds negative factors."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(weight_low, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def ptq_tutorial_style(model, x: torch.Tensor, dummy_input: bool = True):
    """``model`` prepared with :data:`TUTORIAL_STYLE` (BN folded by the quantizer only with ``dummy_input``)
    and calibrated on ``x``."""
    import mixq

    mixq.prepare_(model, TUTORIAL_STYLE, mixq.PTQ(), example_input=x[:1] if dummy_input else None)
    mixq.calibrate_(model, lambda m: m(x))
    return model


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean().clamp(min=1e-30)))


def qat_lenet(data_dir, config=ALL8_WITH_LOGITS, train_limit=20_000):
    """A LeNet after a short QAT run on real MNIST, in eval mode, with its quantizer."""
    task = MnistTask(data_dir, train_limit=train_limit)
    torch.manual_seed(0)
    model = TorchModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    quantizer = QAT_Quantizer(model, config, optimizer, torch.rand(2, 1, 28, 28))
    trainer(model, optimizer, F.nll_loss, task.train_loader(0))
    return model.eval(), quantizer, task


def _centred(t: torch.Tensor) -> torch.Tensor:
    # The model returns log_softmax(logits): centring each row removes the logsumexp shift, leaving the
    # logits (on fc3's int8 output grid) minus their mean.
    return t - t.mean(1, keepdim=True)


def check_int8_parity(backend: str, model, task, batch: int = 500) -> dict:
    """Engine vs the fake-quant PyTorch model on the 10k real test images and on fresh random inputs:
    top-1 agreement, worst per-batch SQNR (dB), and the max error in units of the logits' output scale."""
    engine = ModelSpeedup(model, (batch, 1, 28, 28), batchsize=batch, backend=backend).compress()
    scale = float(model.fc3.output_quantizer.qparams()[0])
    agree, n, sq, steps, errs = 0, 0, [], 0.0, []
    batches = [x for x, _ in torch.utils.data.DataLoader(task.test_set, batch_size=batch)]
    batches.append(torch.randn(batch, 1, 28, 28) * 1.5)
    with torch.no_grad():
        for i, x in enumerate(batches):
            out, _ = engine.inference(x)
            ref = model(x)
            err = (_centred(out) - _centred(ref)).abs() / scale
            if i == len(batches) - 1:
                random_steps, random_p999 = float(err.max()), float(err.flatten().quantile(0.999))
            else:  # agreement and SQNR on the real images
                steps = max(steps, float(err.max()))
                errs.append(err.flatten())
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                n += len(x)
                sq.append(sqnr_db(_centred(ref), _centred(out)))
    return {
        "agreement": agree / n,
        "min_sqnr_db": min(sq),
        "max_error_steps": steps,
        "p999_error_steps": float(torch.cat(errs).quantile(0.999)),
        "exact_fraction": float((torch.cat(errs) < 0.01).float().mean()),
        "random_max_error_steps": random_steps,
        "random_p999_error_steps": random_p999,
        "images": n,
    }


def check_fp32_parity(backend: str) -> float:
    torch.manual_seed(0)
    model = TorchModel().eval()
    x = torch.randn(64, 1, 28, 28)
    engine = ModelSpeedup(model, (64, 1, 28, 28), config={}, batchsize=64, backend=backend).compress()
    out, _ = engine.inference(x)
    with torch.no_grad():
        ref = model(x)
    return float(((out - ref).abs() / ref.abs().clamp(min=1e-3)).max())


def stable_seed(*parts) -> int:
    """A generator seed from a test's parameters that is the same in every process: ``hash()`` of a tuple holding
    strings changes with PYTHONHASHSEED, so a failure seen once could not be reproduced."""
    import zlib

    return zlib.crc32(repr(parts).encode())
