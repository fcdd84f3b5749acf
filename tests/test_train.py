"""mixq.train, the loops `mixq quantize` runs, used directly from Python (the CLI tests and
tests/test_distributed.py::test_cli_quantize_under_torchrun run them through the command line and DDP)."""

import torch
import torch.nn.functional as F

import mixq
from mixq.train import Placement, QATOptions, ptq_calibrate, qat_train
from mixq.zoo.models import create_model


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long()  # a rule the MLP can learn


def test_qat_train_learns_and_moves_the_quantized_weights():
    x, y = _data()
    model = create_model("tiny_mlp")
    mixq.prepare_(model, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], mixq.QAT())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = F.cross_entropy(model(x), y).item()
    qat_train(model, optimizer, x, y, F.cross_entropy, QATOptions(epochs=5, batch_size=64))
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
        acc = float((model(x).argmax(1) == y).float().mean())
    assert after < before * 0.7 and acc > 0.8, (before, after, acc)


def test_progress_gets_one_update_per_step_and_a_close_per_epoch():
    x, y = _data(200)
    model = create_model("tiny_mlp")
    events = []

    class Bar:
        def __init__(self, total, desc):
            events.append(("open", total, desc))

        def update(self, n=1, loss=None, images=None):
            events.append(("step", images))

        def close(self):
            events.append(("close",))

    qat_train(
        model, torch.optim.SGD(model.parameters(), lr=0.01), x, y, F.cross_entropy, QATOptions(2, 64), progress=Bar
    )
    # 200 images in batches of 64: 4 steps (the last one of 8 images) per epoch, one process: no batch dropped
    assert events[:6] == [
        ("open", 4, "QAT epoch 1/2"),
        ("step", 64),
        ("step", 64),
        ("step", 64),
        ("step", 8),
        ("close",),
    ]
    assert len(events) == 12


def test_ptq_calibrate_takes_an_equal_shard_per_rank():
    x, _ = _data(300)
    notes = []
    for rank in (0, 1):
        model = create_model("tiny_mlp")
        mixq.prepare_(model, [{"quant_types": ["input"], "quant_bits": 8, "op_types": ["Linear"]}], mixq.PTQ())
        seen = ptq_calibrate(model, x, 64, Placement(rank=rank, world=2), notes.append)
        assert seen == 128  # 300 // 2 ranks, rounded down to whole batches: the same batch count on every rank
        lo, hi = x[rank * 128 : (rank + 1) * 128].aminmax()
        observer = mixq.quantized_layers(model)["fc1"].input_quantizer.observer
        assert float(observer.min_val) == float(lo) and float(observer.max_val) == float(hi)
    assert notes == ["PTQ: calibrating on 128 images in batches of 64"] * 2
