"""The QAT training step is device-friendly: a prepared model compiles once, with no graph breaks and no
recompiles over many steps (quant_start_step counting, EMA observers starting empty), and computes exactly
what the eager model computes. Fake quantization under bf16 autocast is done in float32."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mixq
from mixq.primitives import fake_quantize
from mixq.spec import IntType
from mixq.zoo.models import create_model

CONFIG = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"], "quant_start_step": 3},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_prepared_model_compiles_once_and_matches_eager():
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(6)]
    mixq.prepare_(model, CONFIG, mixq.QAT(), example_input=batches[0][0][:1])
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    # fullgraph: any graph break raises; error_on_recompile: a second compilation raises
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _train(compiled, batches)
    want = _train(eager, batches)
    # The first step is the same computation; later steps drift apart slightly because the traced graph's
    # decomposed BatchNorm rounds differently and a few values then land on the other side of a rounding
    # boundary of the 8-bit grid (one step of one element), which training carries on.
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        if not a.is_floating_point():
            assert torch.equal(a, b), name
    # the step counter and the observers moved on the device: Linear quantizes from step 3 on
    assert int(model.fc.steps) == len(batches)
    assert bool(model.conv1.input_quantizer.observer.observed)


def test_compiled_step_gradients_match_eager():
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    mixq.prepare_(model, CONFIG, mixq.QAT(), example_input=x[:1])
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    F.cross_entropy(torch.compile(model, backend="aot_eager", fullgraph=True)(x), y).backward()
    F.cross_entropy(eager(x), y).backward()
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_quant_start_step_gates_without_host_reads():
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    x = torch.randn(4, 3, 32, 32)
    mixq.prepare_(model, CONFIG, mixq.QAT(), example_input=x[:1])
    fc = model.fc
    inputs = []
    fc.input_quantizer.register_forward_hook(lambda m, args, out: inputs.append(out.detach().clone()))
    model.train()
    for _ in range(4):
        model(x)
    scale, zp = fc.input_quantizer.qparams()
    requantized = [fake_quantize(t, scale, zp, IntType(8, False)) for t in inputs]
    # steps 0-2 feed fc its float input; from step 3 on the input is on the 8-bit grid
    assert not torch.equal(requantized[2], inputs[2])
    torch.testing.assert_close(requantized[3], inputs[3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_quantize_16bit_inputs_use_float32_math(dtype):
    torch.manual_seed(1)
    x = (torch.randn(4096) * 3).to(dtype)
    scale, zp = torch.tensor(0.0237), torch.tensor(131)
    got = fake_quantize(x, scale, zp, IntType(8, False))
    assert got.dtype == dtype
    want = fake_quantize(x.float(), scale, zp, IntType(8, False)).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # gradient: straight through inside the range, zero where clamped
    xr = x.detach().requires_grad_()
    fake_quantize(xr, scale, zp, IntType(8, False)).sum().backward()
    q = torch.round(x.float() / scale) + zp
    torch.testing.assert_close(xr.grad, ((q >= 0) & (q <= 255)).to(dtype))


def test_deferred_range_recording_compiles_once_without_graph_breaks():
    """Under torch.distributed the observers only record their batch range in the forward
    (mixq.quantization.sync); that forward must compile as one graph too, with no recompiles over steps."""
    from mixq.observers import EMAMinMaxObserver

    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(4)]
    mixq.prepare_(model, CONFIG, mixq.QAT(), example_input=batches[0][0][:1])
    observers = [m for m in model.modules() if isinstance(m, EMAMinMaxObserver)]
    for o in observers:
        o.deferred_sync = True
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in batches:
            F.cross_entropy(compiled(x), y).backward()
            lo, hi = observers[0].pending_range
            assert torch.equal(lo, x.min()) and torch.equal(hi, x.max())  # conv1's input: this batch's range
            for o in observers:  # what RangeSync does after the forward, here without another rank
                o.apply_global_range(*o.pending_range)
                o.pending_range = None
    assert all(bool(o.observed) for o in observers)
