"""Quantizers on a CUDA model (device-only)."""

import pytest
import torch

import mixq
from mixq.nni import QAT_Quantizer
from mixq.zoo.models import create_model

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

CONFIG = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def test_prepare_after_to_cuda_keeps_every_buffer_on_the_gpu():
    model = create_model("tiny_resnet").cuda()
    QAT_Quantizer(model, CONFIG, None, torch.randn(2, 3, 32, 32, device="cuda"))
    states = list(model.parameters()) + list(model.buffers())
    assert {t.device.type for t in states} == {"cuda"}
    model.train()
    model(torch.randn(8, 3, 32, 32, device="cuda")).sum().backward()
    assert {t.device.type for t in model.buffers()} == {"cuda"}


def test_cuda_qat_matches_cpu_qat():
    torch.manual_seed(0)
    cpu = create_model("tiny_resnet")
    gpu = create_model("tiny_resnet")
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(16, 3, 32, 32)
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        mixq.prepare_(m, CONFIG, mixq.QAT(), example_input=x[:2].to(dev))
        m.train()
        m(x.to(dev))
        m.eval()
    with torch.no_grad():
        a, b = cpu(x), gpu(x.cuda()).cpu()
    assert float((a - b).abs().max()) < 1e-3 * float(a.abs().max())
