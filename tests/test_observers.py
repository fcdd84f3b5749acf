import math

import pytest
import torch

from mixq import ConfigError, IntType, PerChannel, QuantSpec, choose_qparams, fake_quantize
from mixq.observers import (
    EMAMinMaxObserver,
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)

U8 = QuantSpec(IntType(8, False), symmetric=False)
S8 = QuantSpec(IntType(8, True), symmetric=True)


def test_minmax_tracks_running_extremes_and_resets():
    obs = MinMaxObserver(U8)
    assert not obs.initialized
    with pytest.raises(RuntimeError, match="observed no data"):
        obs.qparams()
    obs.observe(torch.tensor([0.5, 2.0]))
    obs.observe(torch.tensor([-1.0, 1.0]))
    assert obs.range() == (torch.tensor(-1.0), torch.tensor(2.0))
    s, z = obs.qparams()
    s_ref, z_ref = choose_qparams(-1.0, 2.0, U8)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    obs.reset()
    assert not obs.initialized


def test_minmax_per_channel_and_state_dict_round_trip():
    spec = QuantSpec(IntType(8, True), True, PerChannel(1))
    obs = MinMaxObserver(spec)
    x = torch.randn(4, 3, 5)
    obs.observe(x)
    assert torch.equal(obs.max_val, x.amax(dim=(0, 2)))
    fresh = MinMaxObserver(spec)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and fresh.initialized


def test_ema_follows_nni_update_rule():
    obs = EMAMinMaxObserver(U8, decay=0.9)
    obs.observe(torch.tensor([0.0, 10.0]))
    obs.observe(torch.tensor([0.0, 20.0]))
    assert float(obs.max_val) == pytest.approx(0.9 * 10 + 0.1 * 20)
    with pytest.raises(ConfigError):
        EMAMinMaxObserver(U8, decay=1.0)


def _heavy_tailed(n=200_000):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g).abs()
    x[:20] = 60.0  # rare outliers
    return x


def test_percentile_clips_outliers():
    obs = PercentileObserver(U8, percentile=99.9)
    x = _heavy_tailed()
    obs.observe(x[: len(x) // 2])
    obs.observe(x[len(x) // 2 :])
    lo, hi = obs.range()
    true_q = torch.quantile(x[:100_000], 0.999)  # same distribution
    assert float(lo) == pytest.approx(0.0, abs=0.05)
    assert 0.8 * float(true_q) < float(hi) < 1.3 * float(true_q)


def test_histogram_widening_keeps_total_count():
    obs = PercentileObserver(S8)
    obs.observe(torch.randn(1000))
    obs.observe(torch.randn(1000) * 10)
    assert float(obs.hist.sum()) == pytest.approx(2000)
    assert float(obs.lo) <= -10 and float(obs.hi) >= 10


def _err(qparams, v, spec=U8):
    return float(((fake_quantize(v, *qparams, spec.dtype) - v) ** 2).mean())


def test_entropy_clips_rare_outliers():
    x = _heavy_tailed()
    obs = EntropyObserver(U8)
    obs.observe(x)
    lo, hi = obs.range()
    assert float(lo) == 0.0 and float(hi) < 60.0
    bulk = x[20:]  # the values without the outliers
    assert _err(choose_qparams(lo, hi, U8), bulk) < _err(choose_qparams(x.min(), x.max(), U8), bulk) / 4


def test_mse_clipping_lowers_total_error_on_heavy_tails():
    spec = QuantSpec(IntType(4, True), symmetric=True)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    obs = MSEObserver(spec)
    obs.observe(x)
    lo, hi = obs.range()
    assert float(hi) < float(x.max())
    assert _err(choose_qparams(lo, hi, spec), x, spec) < 0.7 * _err(choose_qparams(x.min(), x.max(), spec), x, spec)


def test_entropy_on_signed_data_clips_symmetrically():
    x = torch.randn(100_000)
    x[0] = 50.0
    obs = EntropyObserver(S8)
    obs.observe(x)
    lo, hi = obs.range()
    assert (float(hi) < 50 and math.isclose(-float(lo), float(hi), rel_tol=1e-6)) or float(lo) == float(x.min())


def test_histogram_observers_reject_per_channel_and_nan():
    with pytest.raises(ConfigError, match="per-tensor"):
        EntropyObserver(QuantSpec(IntType(8, True), True, PerChannel(0)))
    obs = MSEObserver(U8)
    with pytest.raises(ValueError, match="NaN"):
        obs.observe(torch.tensor([1.0, float("nan")]))


def test_make_observer_names_valid_choices():
    with pytest.raises(ConfigError, match="entropy"):
        make_observer("kl", U8)
