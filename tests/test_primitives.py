import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq import IntType, PerChannel, PerTensor, QuantSpec, choose_qparams, dequantize, fake_quantize
from mixq.primitives import SCALE_EPS, choose_qparams_from_tensor, fake_quantize_lsq, quantize, tensor_range


def ref_qparams(lo, hi, spec):
    """Float64 reference written independently from the docstring's formulas."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = spec.dtype.qmin, spec.dtype.qmax
    if spec.symmetric:
        zp = 0 if spec.dtype.signed else 2 ** (spec.dtype.bits - 1)
        scale = max(max(-lo, hi) / (qmax - zp), SCALE_EPS)
        return np.float32(scale), zp
    scale = np.float32(max((hi - lo) / (qmax - qmin), SCALE_EPS))
    zp = int(np.clip(qmin - np.round(lo / np.float64(scale)), qmin, qmax))
    return scale, zp


def ref_quantize(x: np.ndarray, scale, zp, dtype: IntType):
    return np.clip(np.round(x / np.float64(scale)) + zp, dtype.qmin, dtype.qmax).astype(np.int64)


SPECS = [
    QuantSpec(IntType(bits, signed), symmetric)
    for bits in (2, 3, 4, 7, 8, 12, 16)
    for signed in (True, False)
    for symmetric in (True, False)
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dtype.name}-{s.scheme}")
def test_qparams_and_quantize_match_float64_reference(spec):
    x = torch.randn(4096, dtype=torch.float64) * 3 + 0.7
    lo, hi = float(x.min()), float(x.max())
    scale, zp = choose_qparams(lo, hi, spec)
    rscale, rzp = ref_qparams(lo, hi, spec)
    assert float(scale) == pytest.approx(float(rscale), rel=1e-7)
    assert int(zp) == rzp
    q = quantize(x, scale, zp, spec.dtype)
    np.testing.assert_array_equal(q.numpy(), ref_quantize(x.numpy(), scale.item(), int(zp), spec.dtype))
    assert q.dtype == torch.int32
    assert int(q.min()) >= spec.dtype.qmin and int(q.max()) <= spec.dtype.qmax
    deq = dequantize(q, scale, zp, out_dtype=torch.float64)
    np.testing.assert_allclose(deq.numpy(), (q.numpy() - rzp) * np.float64(scale.item()), rtol=0, atol=0)


def test_rounding_is_half_to_even_like_onnx():
    spec = QuantSpec(IntType(8, True), symmetric=True)
    scale, zp = torch.tensor(1.0), torch.tensor(0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, -130.0])
    assert quantize(x, scale, zp, spec.dtype).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128, -128]


def test_range_always_contains_zero_and_zero_is_exact():
    for spec in SPECS:
        for lo, hi in ((2.0, 5.0), (-5.0, -1.0), (0.0, 0.0), (-3.0, 7.0)):
            scale, zp = choose_qparams(lo, hi, spec)
            assert float(scale) > 0
            assert spec.dtype.qmin <= int(zp) <= spec.dtype.qmax
            zero = fake_quantize(torch.zeros(3), scale, zp, spec.dtype)
            assert torch.equal(zero, torch.zeros(3))


def test_symmetric_zero_points_and_uint_midpoint():
    s = QuantSpec(IntType(8, True), True)
    u = QuantSpec(IntType(8, False), True)
    assert int(choose_qparams(-1.0, 2.54, s)[1]) == 0
    assert int(choose_qparams(-1.0, 2.54, u)[1]) == 128
    assert float(choose_qparams(-1.0, 2.54, s)[0]) == pytest.approx(2.54 / 127)


def test_degenerate_range_gets_eps_scale():
    spec = QuantSpec(IntType(8, False), False)
    scale, zp = choose_qparams(0.0, 0.0, spec)
    assert float(scale) == pytest.approx(SCALE_EPS)
    assert int(zp) == 0


@pytest.mark.parametrize("bad", [(float("nan"), 1.0), (0.0, float("inf")), (2.0, 1.0)])
def test_choose_qparams_rejects_bad_ranges(bad):
    with pytest.raises(ValueError):
        choose_qparams(*bad, QuantSpec(IntType(8, True), True))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_any_axis_matches_per_slice_reference(axis, symmetric):
    spec = QuantSpec(IntType(8, True), symmetric, PerChannel(axis))
    x = torch.randn(5, 6, 7, dtype=torch.float64) * torch.linspace(0.1, 4, 7, dtype=torch.float64)
    scale, zp = choose_qparams_from_tensor(x, spec)
    n = x.shape[axis]
    assert scale.shape == (n,) and zp.shape == (n,)
    q = quantize(x, scale, zp, spec.dtype, axis)
    per_tensor = QuantSpec(spec.dtype, symmetric, PerTensor())
    for c in range(n):
        sl = x.select(axis, c)
        s_ref, z_ref = ref_qparams(float(sl.min()), float(sl.max()), per_tensor)
        assert float(scale[c]) == pytest.approx(float(s_ref), rel=1e-7) and int(zp[c]) == z_ref
        np.testing.assert_array_equal(
            q.select(axis, c).numpy(), ref_quantize(sl.numpy(), scale[c].item(), z_ref, spec.dtype)
        )


def test_per_channel_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 channels along axis 0"):
        quantize(torch.randn(3, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), IntType(8, True), axis=0)
    with pytest.raises(ValueError, match="need an axis"):
        quantize(torch.randn(3, 4), torch.ones(3), torch.zeros(3, dtype=torch.int32), IntType(8, True))
    with pytest.raises(ValueError, match="out of range"):
        tensor_range(torch.randn(3, 4), QuantSpec(IntType(8, True), True, PerChannel(2)))


def test_float32_quantize_differs_from_float64_only_at_near_ties():
    spec = QuantSpec(IntType(8, False), False)
    x = torch.randn(100_000) * 2
    scale, zp = choose_qparams_from_tensor(x, spec)
    q32 = quantize(x, scale, zp, spec.dtype).numpy()
    q64 = ref_quantize(x.double().numpy(), scale.item(), int(zp), spec.dtype)
    diff = q32 != q64
    assert np.abs(q32 - q64).max() <= 1
    frac = np.abs((x.double().numpy() / scale.item()) % 1 - 0.5)
    assert np.all(frac[diff] < 1e-5)


def test_fake_quantize_values_and_straight_through_gradient():
    spec = QuantSpec(IntType(4, True), True)
    scale, zp = torch.tensor(0.5), torch.tensor(0)
    x = torch.tensor([-5.0, -4.1, -1.26, 0.0, 0.74, 3.4, 3.8, 9.0], requires_grad=True)
    y = fake_quantize(x, scale, zp, spec.dtype)
    expected = dequantize(quantize(x.detach(), scale, zp, spec.dtype), scale, zp)
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    # int4 range [-8, 7] * 0.5 = [-4, 3.5]; rounding happens before clamping (-4.1 -> -8 is inside).
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_forward_matches_fake_quantize_and_scale_gets_gradient():
    spec = QuantSpec(IntType(8, False), False)
    x = torch.rand(64) * 3
    scale = torch.tensor(0.01, requires_grad=True)
    zp = torch.tensor(0)
    y = fake_quantize_lsq(x, scale, zp, spec.dtype, grad_scale=0.5)
    assert torch.allclose(y, fake_quantize(x, scale.detach(), zp, spec.dtype))
    y.sum().backward()
    # Clamped elements contribute qmax per element; scaled by grad_scale.
    clamped = (x / 0.01).round() > 255
    assert float(scale.grad) == pytest.approx(
        0.5 * float(255 * clamped.sum() + ((x / 0.01).round() - x / 0.01)[~clamped].sum()), rel=1e-4
    )


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(2, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
    lo=st.floats(-1e4, 1e4, allow_nan=False),
    width=st.floats(0, 1e4, allow_nan=False),
)
def test_property_qparams_cover_range_with_half_step_error(bits, signed, symmetric, lo, width):
    spec = QuantSpec(IntType(bits, signed), symmetric)
    hi = lo + width
    scale, zp = choose_qparams(lo, hi, spec)
    assert float(scale) > 0 and spec.dtype.qmin <= int(zp) <= spec.dtype.qmax
    x = torch.linspace(min(lo, 0.0), max(hi, 0.0), 101, dtype=torch.float64)
    err = (fake_quantize(x, scale.double(), zp, spec.dtype) - x).abs().max()
    # Every value inside the widened range is within half a step (plus float rounding), except that
    # symmetric specs cannot reach qmin - zp == -amax/scale - 1... they reach further, never less.
    assert float(err) <= float(scale) * 0.5 * (1 + 1e-6) + 1e-9 * max(abs(lo), abs(hi), 1)
