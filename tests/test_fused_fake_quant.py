"""The fused fake-quantization kernels (mixq.quantization.fused) against the reference math, and the dispatch.

Reference: the same quantizer modules on the plain torch path (``use_fused`` off), i.e. EMAMinMaxObserver's
``observe``/``fold_range``, ``choose_qparams``, ``primitives.fake_quantize`` / ``fake_quantize_lsq`` and their
autograd. Every comparison is bit for bit (``torch.equal``) except LSQ's scale gradient, a sum over the tensor
that the kernel adds up in another order than torch: it is checked against the exact (float64) sum of the same
float32 terms within the worst-case error bound of float32 summation, ``(number of terms) * 2**-24 *
sum(|terms|)`` (Higham's gamma_n, doubled for the final additions), which holds for any summation order, torch's
included.

Fresh random inputs for every case (never zeros), several training steps for the EMA state. On a machine without
a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported).
"""

import contextlib
import copy
import importlib.util
import os
import sys

import pytest
import torch

from engine_cases import stable_seed

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: fused fake-quant kernels not tested here", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    if "mixq.quantization.fused" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels were compiled for a GPU before this module set TRITON_INTERPRET=1",
                    allow_module_level=True)  # fmt: skip
    os.environ["TRITON_INTERPRET"] = "1"

from mixq.observers import EMAMinMaxObserver  # noqa: E402
from mixq.primitives import choose_qparams_from_tensor, fake_quantize_lsq  # noqa: E402
from mixq.quantization import fake_quant, fused  # noqa: E402
from mixq.quantization.fake_quant import (  # noqa: E402
    ActivationQuant,
    LSQActivationQuant,
    LSQWeightQuant,
    WeightQuant,
    fused_available,
    use_fused,
)
from mixq.spec import IntType, PerChannel, QuantSpec  # noqa: E402

U32 = 2.0**-24  # unit roundoff of float32

SPECS = {  # name: (bits, signed, symmetric, convention)
    "uint8-affine": QuantSpec(IntType(8, False), symmetric=False),
    "int8-symmetric": QuantSpec(IntType(8, True), symmetric=True),
    "int7-affine": QuantSpec(IntType(7, True), symmetric=False),
    "uint4-symmetric": QuantSpec(IntType(4, False), symmetric=True),
    "int4-affine": QuantSpec(IntType(4, True), symmetric=False),
    "nni-int8-symmetric": QuantSpec(IntType(8, True, narrow=True), symmetric=True, convention="nni"),
    "nni-uint8-symmetric": QuantSpec(IntType(8, False), symmetric=True, convention="nni"),
}


def per_channel(spec: QuantSpec) -> QuantSpec:
    return QuantSpec(spec.dtype, spec.symmetric, PerChannel(0), spec.convention)


def rand_activation(gen, shape, step: int, dtype=torch.float32, channels_last=False) -> torch.Tensor:
    """Random activations whose range moves from step to step (shifted, scaled; some batches all positive)."""
    scale = 0.1 + 3 * torch.rand((), generator=gen).item()
    shift = (torch.rand((), generator=gen).item() - 0.3) * scale * (1 + step % 2)
    x = (torch.randn(shape, generator=gen) * scale + shift).to(DEVICE, dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def rand_weight(gen, shape) -> torch.Tensor:
    """Per-output-channel magnitudes over six decades; one channel all positive, one all negative."""
    w = torch.randn(shape, generator=gen) * 10 ** (6 * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen) - 4)
    w[0] = w[0].abs() + 0.01
    w[-1] = -w[-1].abs() - 0.01
    return w.to(DEVICE)


@pytest.fixture
def fused_calls(monkeypatch):
    """Force the fused path (as on a CUDA tensor in eager mode) and count the fused entry points' calls."""
    calls = {"observed": 0, "weight": 0, "lsq": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(fused, "observe_and_fake_quantize", counting("observed", fused.observe_and_fake_quantize))
    monkeypatch.setattr(fused, "fake_quantize_weight", counting("weight", fused.fake_quantize_weight))
    monkeypatch.setattr(fused, "fake_quantize_lsq", counting("lsq", fused.fake_quantize_lsq))
    monkeypatch.setattr(fake_quant, "use_fused", lambda x: True)
    return calls


@contextlib.contextmanager
def unfused(monkeypatch):
    """The reference: the same modules on the plain torch path."""
    with monkeypatch.context() as m:
        m.setattr(fake_quant, "use_fused", lambda x: False)
        yield


def run_step(module, x, upstream, *args):
    x = x.detach().clone().requires_grad_()
    out = module(x, *args)
    out.backward(upstream)
    return out.detach(), x.grad


def assert_same_step(fus, ref, x, upstream, monkeypatch, *args):
    """One forward/backward of the fused module and of the reference on the torch path: the same output, input
    gradient and (for activation quantizers) observer range, bit for bit. Returns the fused output."""
    got, got_grad = run_step(fus, x, upstream, *args)
    with unfused(monkeypatch):
        want, want_grad = run_step(ref, x, upstream, *args)
    assert got.dtype == x.dtype and got.stride() == x.stride()
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    assert torch.equal(got_grad, want_grad)
    for name in ("min_val", "max_val", "observed"):
        if hasattr(ref, "observer"):
            assert torch.equal(getattr(fus.observer, name), getattr(ref.observer, name)), name
    return got


def gate_value(kind: str):
    return {"python-true": True, "tensor-on": torch.tensor(True, device=DEVICE),
            "tensor-off": torch.tensor(False, device=DEVICE)}[kind]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Activations: EMA observe + fake quantize + straight-through gradient


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_matches_reference_over_steps(spec_name, dtype, fused_calls, monkeypatch):
    spec = SPECS[spec_name]
    gen = torch.Generator().manual_seed(stable_seed(spec_name, str(dtype)))
    ref = ActivationQuant(spec, EMAMinMaxObserver(spec, decay=0.9), observe_in_training=True).to(DEVICE).train()
    fus = copy.deepcopy(ref)
    for step in range(4):
        x = rand_activation(gen, (3, 5, 7, 6), step, dtype, channels_last=step % 2 == 1)
        upstream = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
        gate = gate_value(["python-true", "tensor-on", "tensor-off", "tensor-on"][step])
        got = assert_same_step(fus, ref, x, upstream, monkeypatch, gate, False)
        if gate is not True and not bool(gate):
            assert torch.equal(got, x)  # gate off: the input itself, the observer still moves
        elif step > 0:
            assert not torch.equal(got, x)
    assert fused_calls["observed"] == 4


def test_activation_many_partials_and_loop_iterations(fused_calls, monkeypatch):
    """Small blocks force several programs, each looping over several blocks, with a ragged tail."""
    monkeypatch.setattr(fused, "BLOCK", 64)
    monkeypatch.setattr(fused, "MAX_PARTIALS", 3)
    spec = SPECS["uint8-affine"]
    gen = torch.Generator().manual_seed(5)
    ref = ActivationQuant(spec, EMAMinMaxObserver(spec), observe_in_training=True).to(DEVICE).train()
    fus = copy.deepcopy(ref)
    for step in range(3):
        x = rand_activation(gen, (2, 3, 11, 13), step)  # 858 elements: 14 blocks over 3 programs
        assert_same_step(fus, ref, x, torch.randn(x.shape, generator=gen).to(DEVICE), monkeypatch, True, False)
    assert fused_calls["observed"] == 3


def test_activation_deferred_sync_records_the_range_and_quantizes_with_the_old_state(fused_calls, monkeypatch):
    spec = SPECS["int8-symmetric"]
    gen = torch.Generator().manual_seed(11)
    ref = ActivationQuant(spec, EMAMinMaxObserver(spec), observe_in_training=True).to(DEVICE).train()
    fus = copy.deepcopy(ref)
    for module in (ref, fus):
        module.observer.deferred_sync = True
    for step in range(3):
        x = rand_activation(gen, (4, 3, 5, 5), step)
        got = assert_same_step(fus, ref, x, torch.randn(x.shape, generator=gen).to(DEVICE), monkeypatch, True, False)
        if step == 0:
            assert torch.equal(got, x)  # nothing synced yet: not ready, not quantized
        for module in (ref, fus):  # the cross-rank sync, single process: fold the recorded range in
            lo, hi = module.observer.pending_range
            module.observer.pending_range = None
            module.observer.apply_global_range(lo, hi)
        assert torch.equal(fus.observer.min_val, ref.observer.min_val)
        assert torch.equal(fus.observer.max_val, ref.observer.max_val)
    assert fused_calls["observed"] == 3


def test_activation_distributed_path_hands_the_range_to_fold_range(fused_calls, monkeypatch):
    """Under torch.distributed (without deferred sync) the EMA step is fold_range's (after its all-reduce) and the
    qparams come from the new state; single process here, where all_reduce_range is the identity."""
    monkeypatch.setattr(fused, "is_distributed", lambda: True)
    spec = SPECS["int7-affine"]
    gen = torch.Generator().manual_seed(13)
    ref = ActivationQuant(spec, EMAMinMaxObserver(spec), observe_in_training=True).to(DEVICE).train()
    fus = copy.deepcopy(ref)
    folded = []
    fold = fus.observer.fold_range
    monkeypatch.setattr(fus.observer, "fold_range", lambda lo, hi: (folded.append((lo, hi)), fold(lo, hi)))
    for step in range(3):
        x = rand_activation(gen, (4, 3, 5, 5), step)
        assert_same_step(fus, ref, x, torch.randn(x.shape, generator=gen).to(DEVICE), monkeypatch, True, False)
        assert torch.equal(torch.stack(folded[-1]), torch.stack(torch.aminmax(x.float())))
    assert len(folded) == 3 and fused_calls["observed"] == 3


# --------------------------------------------------------------------------------------------------------------
# Weights: min/max qparams + fake quantize + straight-through gradient


@pytest.mark.parametrize("spec_name", ["uint8-affine", "int8-symmetric", "int7-affine", "uint4-symmetric",
                                       "nni-int8-symmetric"])  # fmt: skip
@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("layout", ["conv", "conv-channels-last", "linear"])
def test_weight_matches_reference(spec_name, granularity, layout, fused_calls, monkeypatch):
    spec = SPECS[spec_name] if granularity == "per-tensor" else per_channel(SPECS[spec_name])
    gen = torch.Generator().manual_seed(stable_seed(spec_name, granularity, layout))
    w = rand_weight(gen, (33, 7) if layout == "linear" else (17, 5, 3, 3))
    if layout == "conv-channels-last":
        w = w.contiguous(memory_format=torch.channels_last)
    assert_same_step(
        WeightQuant(spec), WeightQuant(spec), w, torch.randn(w.shape, generator=gen).to(DEVICE), monkeypatch
    )
    assert fused_calls["weight"] == 1


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_weight_qparams_equal_choose_qparams(spec_name, monkeypatch):
    """Scale and zero point of every channel bit for bit, over magnitudes from 1e-9 to 1e3, one-signed channels,
    a constant channel and an all-zero one (scale eps); several loop iterations per channel."""
    monkeypatch.setattr(fused, "BLOCK", 16)
    spec = per_channel(SPECS[spec_name])
    gen = torch.Generator().manual_seed(hash(spec_name) % 2**31)
    w = rand_weight(gen, (41, 45))
    w[1] = w[1] * 1e-5
    w[2] = 0.37
    w[3] = 0.0
    _, scale, zp = fused.fake_quantize_weight(w, spec, return_qparams=True)
    want_scale, want_zp = choose_qparams_from_tensor(w, spec)
    assert torch.equal(scale, want_scale.to(DEVICE))
    assert torch.equal(zp, want_zp.to(DEVICE, torch.float32))


def near_tie_ranges(spec: QuantSpec, gen, n: int = 64) -> torch.Tensor:
    """Ranges whose ``min / scale`` lands near a half integer, where the zero point depends on choose_qparams
    deriving it from the float32 scale rather than the float64 one: returns [n, 2] (min, max), all such cases."""
    qmin, qmax = spec.dtype.qmin, spec.dtype.qmax
    s = 10 ** (4 * torch.rand(4000, generator=gen) - 3)
    k = torch.randint(0, qmax - qmin, (4000,), generator=gen).float()
    lo = -(k + 0.5) * s
    hi = torch.clamp(lo + s * (qmax - qmin), min=0.0)
    lo64, hi64 = lo.double(), hi.double()
    s64 = (hi64 - lo64) / (qmax - qmin)
    zp32, zp64 = (qmin - torch.round(lo64 / s64.float().double()), qmin - torch.round(lo64 / s64))
    differs = (zp32.clamp(qmin, qmax) != zp64.clamp(qmin, qmax)).nonzero().flatten()[:n]
    return torch.stack([lo[differs], hi[differs]], dim=1)


@pytest.mark.parametrize("spec_name", ["uint8-affine", "int7-affine", "int4-affine"])
def test_weight_zero_point_comes_from_the_float32_scale(spec_name):
    spec = per_channel(SPECS[spec_name])
    gen = torch.Generator().manual_seed(hash(spec_name) % 2**31)
    ranges = near_tie_ranges(spec, gen)
    assert len(ranges) >= 16  # the case exists: a kernel deriving it from the float64 scale would differ here
    w = ranges[:, :1] + (ranges[:, 1:] - ranges[:, :1]) * torch.rand(len(ranges), 9, generator=gen)
    w[:, 0], w[:, -1] = ranges[:, 0], ranges[:, 1]
    _, scale, zp = fused.fake_quantize_weight(w.to(DEVICE), spec, return_qparams=True)
    want_scale, want_zp = choose_qparams_from_tensor(w, spec)
    assert torch.equal(scale, want_scale.to(DEVICE))
    assert torch.equal(zp, want_zp.to(DEVICE, torch.float32))


def test_weight_ties_round_half_to_even(fused_calls, monkeypatch):
    """Values exactly half-way between two grid points (power-of-two scales): rounded to even as torch.round."""
    spec = per_channel(SPECS["int8-symmetric"])
    gen = torch.Generator().manual_seed(17)
    step = 2.0 ** -torch.randint(2, 12, (9, 1), generator=gen).float()  # scale = 127 * step / 127, exactly
    w = (torch.randint(-127, 127, (9, 40), generator=gen) + 0.5) * step
    w[:, 0] = 127 * step[:, 0]
    w = w.to(DEVICE)
    got = assert_same_step(
        WeightQuant(spec), WeightQuant(spec), w, torch.randn(w.shape, generator=gen).to(DEVICE), monkeypatch
    )
    assert not torch.equal(got, torch.floor(w / step.to(DEVICE) + 0.5) * step.to(DEVICE))  # ties do occur


# --------------------------------------------------------------------------------------------------------------
# LSQ: output, input gradient, scale gradient


def lsq_scale_grad_bound(x, scale, zp, spec, axis, grad_scale, upstream):
    """Exact (float64) sum of the scale gradient's float32 terms as torch's autograd forms them, and the
    worst-case float32 summation error for any order (gamma_n times the sum of magnitudes), per scale."""
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s_in = scale.detach().float().reshape(shape)
    s = s_in * grad_scale + (s_in - s_in * grad_scale)
    z = zp.reshape(shape).float()
    xf, g = x.detach().float(), upstream.float()
    v = xf / s
    qz = (v + (torch.round(v) - v)) + z
    inside = (qz >= spec.dtype.qmin) & (qz <= spec.dtype.qmax)
    q = qz.clamp(spec.dtype.qmin, spec.dtype.qmax)
    gv = torch.where(inside, g * s, 0.0)
    t_mul, t_div = g * (q - z), -gv * ((xf / s) / s)
    exact = (t_mul.double().sum(dims) + t_div.double().sum(dims)) * grad_scale
    n = x.numel() // exact.numel()
    bound = (2 * n) * U32 * (t_mul.double().abs().sum(dims) + t_div.double().abs().sum(dims)) + 2 * U32 * exact.abs()
    return exact.reshape(scale.shape), bound.reshape(scale.shape) * grad_scale


@pytest.mark.parametrize("spec_name", ["uint8-affine", "int8-symmetric", "uint4-symmetric", "int4-affine"])
@pytest.mark.parametrize("gate_kind", ["python-true", "tensor-on", "tensor-off"])
def test_lsq_activation_matches_reference(spec_name, gate_kind, fused_calls, monkeypatch):
    monkeypatch.setattr(fused, "BLOCK", 128)  # several programs: partial sums of the scale gradient
    spec = SPECS[spec_name]
    gen = torch.Generator().manual_seed(stable_seed(spec_name, gate_kind))
    ref = LSQActivationQuant(spec).to(DEVICE)
    fus = copy.deepcopy(ref)
    gate = gate_value(gate_kind)
    for step in range(2):
        x = rand_activation(gen, (2, 4, 9, 7), step, channels_last=step == 1)
        upstream = torch.randn(x.shape, generator=gen).to(DEVICE)
        for module in (ref, fus):
            module.scale.grad = None
        assert_same_step(fus, ref, x, upstream, monkeypatch, gate, False)
        assert torch.equal(fus.scale, ref.scale)
        grad_scale = 1.0 / (x.numel() * fake_quant._positive_qmax(spec)) ** 0.5
        s = ref.scale.detach().abs().clamp(min=1e-8)
        exact, bound = lsq_scale_grad_bound(x, s, ref.zero_point, spec, None, grad_scale, upstream)
        if gate_kind == "tensor-off":
            exact, bound = torch.zeros_like(exact), torch.zeros_like(bound)
        sign = torch.sign(ref.scale.detach())  # d|s|/ds
        for grad in (fus.scale.grad, ref.scale.grad):
            assert (grad.double() - sign * exact).abs() <= bound, (grad, exact, bound)
    assert fused_calls["lsq"] == 2


@pytest.mark.parametrize("spec_name", ["int8-symmetric", "uint8-affine", "int4-affine"])
@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("layout", ["conv", "conv-channels-last", "linear"])
def test_lsq_weight_matches_reference(spec_name, granularity, layout, fused_calls, monkeypatch):
    monkeypatch.setattr(fused, "BLOCK", 16)  # several blocks per channel
    spec = SPECS[spec_name] if granularity == "per-tensor" else per_channel(SPECS[spec_name])
    gen = torch.Generator().manual_seed(stable_seed(spec_name, granularity, layout))
    w = rand_weight(gen, (13, 21) if layout == "linear" else (11, 3, 3, 3))
    if layout == "conv-channels-last":
        w = w.contiguous(memory_format=torch.channels_last)
    ref = LSQWeightQuant(spec, w).to(DEVICE)
    with torch.no_grad():  # scales off the init value, so some weights clamp
        ref.scale.mul_(torch.rand(ref.scale.shape, generator=gen).to(DEVICE) + 0.3)
    fus = copy.deepcopy(ref)
    upstream = torch.randn(w.shape, generator=gen).to(DEVICE)
    assert_same_step(fus, ref, w, upstream, monkeypatch)
    grad_scale = 1.0 / (w.numel() // ref.scale.numel() * fake_quant._positive_qmax(spec)) ** 0.5
    exact, bound = lsq_scale_grad_bound(w, ref.scale.detach(), ref.zero_point, spec, spec.axis, grad_scale, upstream)
    for grad in (fus.scale.grad, ref.scale.grad):
        assert ((grad.double() - exact).abs() <= bound).all(), (grad, exact, bound)
    assert fused_calls["lsq"] == 1


def test_lsq_bf16_is_computed_in_float32():
    """Under autocast LSQ computes in float32 and rounds the result to bf16, fused and unfused alike: equal to
    the float32 reference rounded, and to the reference given the bf16 tensor, gradients included."""
    spec = SPECS["uint8-affine"]
    gen = torch.Generator().manual_seed(3)
    x = rand_activation(gen, (2, 3, 8, 8), 0, torch.bfloat16).requires_grad_()
    upstream = torch.randn(x.shape, generator=gen).to(DEVICE, torch.bfloat16)
    scale = torch.tensor(0.02, device=DEVICE, requires_grad=True)
    zp = torch.tensor(0, dtype=torch.int32, device=DEVICE)
    got = fused.fake_quantize_lsq(x, scale, zp, spec, None, 0.01)
    got.backward(upstream)
    x32 = x.detach().float().requires_grad_()
    want = fake_quantize_lsq(x32, scale.detach(), zp, spec.dtype, None, 0.01).to(torch.bfloat16)
    want.backward(upstream)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert torch.equal(x.grad, x32.grad.to(torch.bfloat16))
    x16 = x.detach().clone().requires_grad_()
    unfused = fake_quantize_lsq(x16, scale.detach(), zp, spec.dtype, None, 0.01)
    unfused.backward(upstream)
    assert unfused.dtype == torch.bfloat16 and torch.equal(unfused, want)
    assert torch.equal(x16.grad, x.grad)


# --------------------------------------------------------------------------------------------------------------
# A whole model


@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_training_steps_of_a_prepared_model_match_the_torch_path(method, fused_calls, monkeypatch):
    """Three SGD steps of a small prepared ResNet (BN folded, quant_start_step gating the classifier from step 2)
    with the fused kernels and on the torch path: identical losses, gradients, parameters and buffers."""
    import mixq
    from mixq.zoo.models import create_model
    from test_qat_compile import _train as sgd_steps

    config = [{"quant_types": types, "quant_bits": 8, "op_types": [op], **extra}
              for types, op, extra in [(["input", "weight", "output"], "Conv2d", {}), (["output"], "ReLU", {}),
                                       (["input", "weight"], "Linear", {"quant_start_step": 2})]]  # fmt: skip
    gen = torch.Generator().manual_seed(23)
    images = [torch.randn(2, 3, 32, 32, generator=gen).to(DEVICE) for _ in range(3)]
    batches = [(x, torch.randint(0, 10, (2,), generator=gen).to(DEVICE)) for x in images]
    torch.manual_seed(0)
    ref = create_model("tiny_resnet")
    mixq.prepare_(ref, config, mixq.QAT() if method == "qat" else mixq.LSQ(), example_input=batches[0][0][:1].cpu())
    ref = ref.to(DEVICE).train()
    fus = copy.deepcopy(ref)

    def train(model):
        return sgd_steps(model, batches)

    if method == "qat":
        got = train(fus)
        with unfused(monkeypatch):
            want = train(ref)
        assert torch.equal(got, want)
        for (name, a), b in zip(fus.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        assert fused_calls["observed"] > 0 and fused_calls["weight"] > 0
        return
    # LSQ: the scale gradients are sums added up in another order (checked against their error bound above), so
    # training drifts apart in the last bits; one step: the same loss and every other gradient bit for bit.
    batches = batches[:1]
    got = train(fus)
    with unfused(monkeypatch):
        want = train(ref)
    assert torch.equal(got, want)
    for (name, a), b in zip(fus.named_parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        if not name.endswith(".scale"):
            assert torch.equal(a.grad, b.grad), name
    assert fused_calls["lsq"] > 0


# --------------------------------------------------------------------------------------------------------------
# The compiled code (no GPU needed: Triton compiles for Hopper on any machine)

PTX_PROBE = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixq.quantization import fused as f

F = "fp32"
FINALIZE = ({"part_ptr": "*fp32", "n_parts": "i32", "rng_ptr": "*fp32", "min_ptr": "*fp32", "max_ptr": "*fp32",
             "observed_ptr": "*u8", "qp_ptr": "*fp32", "decay": F, "keep": F, "qmin": F, "qmax": F, "sym_zp": F,
             "sym_den": F, "eps": F, "EMA": "constexpr", "QPARAMS_FROM_STATE": "constexpr", "SYMMETRIC": "constexpr",
             "P_BLOCK": "constexpr"}, {"EMA": True, "QPARAMS_FROM_STATE": True, "SYMMETRIC": False, "P_BLOCK": 1024})
FAKE_QUANT = ({"x_ptr": "*bf16", "out_ptr": "*bf16", "mask_ptr": "*u8", "qp_ptr": "*fp32", "gate_ptr": "*u8",
               "n": "i32", "qmin": F, "qmax": F, "HAS_GATE": "constexpr", "BF16": "constexpr", "BLOCK": "constexpr"},
              {"HAS_GATE": True, "BF16": True, "BLOCK": 4096})
LSQ_BACKWARD = ({"g_ptr": "*fp32", "x_ptr": "*fp32", "gx_ptr": "*fp32", "s_ptr": "*fp32", "zp_ptr": "*i32",
                 "gate_ptr": "*u8", "part_ptr": "*fp32", "K": "i32", "gscale": F, "qmin": F, "qmax": F,
                 "HAS_GATE": "constexpr", "BF16": "constexpr", "BLOCK": "constexpr"},
                {"HAS_GATE": False, "BF16": False, "BLOCK": 4096})


def ptx(kernel, sig, fusion):
    src = ASTSource(fn=kernel, signature=sig[0], constexprs=sig[1])
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": fusion})
    return k.asm["ptx"]


def count(text, op):
    return len(re.findall(op, text))


for name, kernel, sig in (("finalize", f._finalize_kernel, FINALIZE), ("fake_quant", f._fake_quant_kernel,
                          FAKE_QUANT), ("lsq_backward", f._lsq_backward_kernel, LSQ_BACKWARD)):
    text = ptx(kernel, sig, fusion=False)
    print(name, count(text, r"\\bfma\\."), count(text, r"div\\.(full|approx)"), count(text, r"div\\.rn"))
print("finalize-with-fusion", count(ptx(f._finalize_kernel, FINALIZE, fusion=True), r"\\bfma\\."), 0, 0)
"""


def test_kernels_compile_for_hopper_with_ieee_division_and_no_fma(tmp_path):
    """The kernels as built for an H100 (sm_90 PTX, compiled here without a GPU, in a process without the
    interpreter): correctly rounded division only (no approximate ``div.full``) and no fused multiply-add, which
    would round the EMA's ``decay * state + (1 - decay) * batch`` or LSQ's scale once instead of twice. The same EMA
    kernel with fusion allowed does contain fma instructions, so the check can fail."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", PTX_PROBE], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr:
        pytest.skip(f"Triton cannot build for sm_90 here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    counts = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in run.stdout.strip().splitlines()}
    for name in ("finalize", "fake_quant", "lsq_backward"):
        fma, approximate_div, ieee_div = counts[name]
        assert fma == 0 and approximate_div == 0 and ieee_div > 0, (name, counts[name])
    assert counts["finalize-with-fusion"][0] > 0


# --------------------------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_decision():
    assert fused_available("cuda", compiling=False)
    assert not fused_available("cuda", compiling=True)
    assert not fused_available("cpu", compiling=False)
    assert not use_fused(torch.randn(3))


def test_dispatch_is_the_torch_path_when_compiling():
    def probe(x):
        return x + 1 if fused_available("cuda", torch.compiler.is_compiling()) else x - 1

    x = torch.randn(4)
    assert torch.equal(probe(x), x + 1)  # eager: a CUDA tensor would take the fused kernels
    torch._dynamo.reset()
    assert torch.equal(torch.compile(probe, backend="eager", fullgraph=True)(x), x - 1)


def test_modules_stay_on_the_torch_path_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(fake_quant, "_fused", lambda: calls.append(1))
    spec = SPECS["uint8-affine"]
    x = torch.randn(2, 3, 4, 4)
    ActivationQuant(spec, EMAMinMaxObserver(spec), observe_in_training=True).train()(x, True, False)
    WeightQuant(per_channel(spec))(torch.randn(4, 3, 3, 3))
    LSQActivationQuant(spec)(x, True, False)
    LSQWeightQuant(spec, torch.randn(4, 3))(torch.randn(4, 3))
    assert calls == []
