"""Quantize, build, compare and report a model of your own (no torchvision, no data set download): a small
1-D signal classifier on synthetic data, through the native API. docs/own-model.md walks through it and the
same steps on the command line. Run: python examples/own_model.py"""

import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq.train import QATOptions, qat_train


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 16, 5)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16 * 28, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def make_data(n: int, generator: torch.Generator):
    """Four classes of two-channel signals: a sine whose frequency is the class, plus noise."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    t = torch.linspace(0, 6.28, 32)
    clean = torch.stack([torch.sin((labels[:, None] + 1) * t), torch.cos((labels[:, None] + 1) * t)], 1)
    return clean + 1.5 * torch.randn(n, 2, 32, generator=generator), labels


def predictions(predict, x, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([predict(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def top1(predict, x, y) -> float:
    return 100.0 * float((predictions(predict, x) == y).float().mean())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, train_y = make_data(2048, g)
    test_x, test_y = make_data(512, g)
    torch.manual_seed(0)
    model = Net()
    # 1. train the float model (your own loop; mixq.train.qat_train is a plain SGD loop that also trains floats)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    qat_train(model, optimizer, train_x, train_y, F.cross_entropy, QATOptions(epochs=3, batch_size=64))
    model.eval()
    print(f"float model: top-1 {top1(model, test_x, test_y):.2f}% on {len(test_y)} test signals")

    # 2. PTQ: int8 everywhere, calibrated on 256 training signals
    mixq.quantize(model, mixq.INT8, lambda m: [m(train_x[i : i + 64]) for i in range(0, 256, 64)])
    print(f"fake-quant model: top-1 {top1(model, test_x, test_y):.2f}%")

    # 3. build an engine (the fastest this machine has), compare it with the fake-quant model, report placement
    engine = mixq.compile(model, test_x[:64], backend="onnxruntime")
    agree = 100.0 * float((predictions(engine, test_x) == predictions(model, test_x)).float().mean())
    print(
        f"engine ({engine.backend}): top-1 {top1(engine, test_x, test_y):.2f}%, {agree:.1f}% top-1 agreement with "
        "the fake-quant model"
    )
    print(engine.report())


if __name__ == "__main__":
    main()
