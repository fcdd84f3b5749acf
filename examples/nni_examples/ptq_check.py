"""Which engine the PTQ example's build ran, and the int8 engine's accuracy when ONNX Runtime is forced
(the example itself uses backend auto, which may keep a float engine when int8 is not faster)."""

import mixed_precision_speedup_mnist as ex
import torch
from torchvision import datasets, transforms

from mixq.nni import ModelSpeedup

torch.manual_seed(0)
trans = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
train_loader = torch.utils.data.DataLoader(
    datasets.MNIST("data", train=True, transform=trans), batch_size=64, shuffle=True
)
test_loader = torch.utils.data.DataLoader(
    datasets.MNIST("data", train=False, transform=trans), batch_size=1000, shuffle=True
)
model = ex.NaiveModel()
ex.train(model, "cpu", train_loader, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5))
ex.test(model, "cpu", test_loader)
config = {
    "conv1": {"weight_bits": 8, "output_bits": 8},
    "conv2": {"weight_bits": 32, "output_bits": 32},
    "fc1": {"weight_bits": 16, "output_bits": 16},
    "fc2": {"weight_bits": 8, "output_bits": 8},
}
for label, kwargs in [
    ("bits config, backend auto", {}),
    ("bits config, onnxruntime", {"backend": "onnxruntime"}),
    ("all int8 (config=None, extra_layer_bits=8), onnxruntime", {"backend": "onnxruntime", "extra_layer_bits": 8}),
]:
    cfg = None if "extra_layer_bits" in kwargs else config
    engine = ModelSpeedup(model, (32, 1, 28, 28), config=cfg, calib_data_loader=train_loader, batchsize=32, **kwargs)
    engine.compress()
    print(f"== {label}")
    print(engine.report())
    ex.test_trt(engine, test_loader)
