"""backend="auto": the choice logic on given timings, and the invariant on real engines."""

import pytest
import torch

import mixq
import mixq.auto as auto
from mixq.backends import Engine, EngineError
from mixq.speedup import ModelSpeedup
from mixq.zoo.models import TorchModel


class _FakeEngine(Engine):
    backend = "fake"

    def __init__(self, name, inexact=""):
        super().__init__((1, 4), {})
        self.name = name
        self.inexact = inexact

    def run(self, x, check_finite=True):
        return x

    def placement(self):
        return []

    def profile(self, x, runs=20):
        return []

    def members(self):
        return {}


def _select(monkeypatch, times: dict[str, float], fail=(), inexact=()):
    monkeypatch.setattr(
        auto, "median_latency", lambda runners, x, warmup, runs, rounds: {k: times[k] / 1e3 for k in runners}
    )

    def build(name):
        def make():
            if name in fail:
                raise EngineError(f"{name} cannot build this")
            return _FakeEngine(name, f"{name} saturates here" if name in inexact else "")

        return make

    quantized = {b: build(f"{b} quantized") for b in ("ort", "ov") if f"{b} quantized" in times}
    floats = {b: build(f"{b} float") for b in ("ort", "ov") if f"{b} float" in times}
    return auto.select_engine(quantized, floats, torch.zeros(2, 4))


def test_auto_keeps_the_fastest_quantized_engine(monkeypatch):
    engine, sel = _select(monkeypatch, {"ort quantized": 5.0, "ov quantized": 2.0, "ort float": 4.0, "ov float": 6.0})
    assert engine.name == "ov quantized" and sel.chosen == "ov quantized"
    assert sel.reason == "kept the fastest quantized engine (2.00x faster than the fastest float engine)"


def test_auto_never_returns_a_quantized_engine_slower_than_the_fastest_float_one(monkeypatch):
    engine, sel = _select(monkeypatch, {"ort quantized": 5.0, "ov quantized": 3.0, "ort float": 2.5, "ov float": 6.0})
    assert engine.name == "ort float"
    assert sel.reason.startswith("every quantized engine was slower than ort float (ov quantized: 3.000 ms vs")
    assert "<- chosen" in next(line for line in str(sel).splitlines() if "ort float" in line)


def test_auto_skips_a_backend_that_fails_and_says_so(monkeypatch):
    engine, sel = _select(
        monkeypatch, {"ort quantized": 5.0, "ov quantized": 1.0, "ort float": 9.0}, fail={"ov quantized"}
    )
    assert engine.name == "ort quantized"
    assert sel.reason.endswith("not built or skipped: ov quantized: ov quantized cannot build this")


def test_auto_skips_an_inexact_quantized_engine_however_fast_and_says_why(monkeypatch):
    times = {"ort quantized": 5.0, "ov quantized": 1.0, "ort float": 9.0, "ov float": 8.0}
    engine, sel = _select(monkeypatch, times, inexact={"ov quantized"})
    assert engine.name == "ort quantized"
    assert "ov quantized" not in {c.name for c in sel.candidates}
    assert sel.reason.endswith("skipped: ov quantized: skipped, not exact: ov quantized saturates here")
    assert "not exact: ov quantized saturates here" in str(sel)


def test_auto_with_every_quantized_engine_inexact_keeps_float_and_says_why(monkeypatch):
    times = {"ov quantized": 1.0, "ort float": 9.0, "ov float": 8.0}
    engine, sel = _select(monkeypatch, times, inexact={"ov quantized"})
    assert engine.name == "ov float"
    assert sel.reason.startswith("no quantized engine was left to time: kept the fastest float engine")
    assert "ov quantized: skipped, not exact" in sel.reason


def test_auto_with_nothing_buildable_is_one_error(monkeypatch):
    with pytest.raises(EngineError, match="backend 'auto': no candidate engine could be built: ort float: ort float"):
        _select(monkeypatch, {"ort float": 1.0}, fail={"ort float"})


def test_auto_on_a_real_model_times_every_cpu_backend_and_keeps_its_promise():
    torch.manual_seed(0)
    model = TorchModel().eval()
    config = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
    mixq.prepare_(model, config, mixq.PTQ())
    x = torch.randn(16, 1, 28, 28)
    mixq.calibrate_(model, lambda m: m(x))
    s = ModelSpeedup(model, (16, 1, 28, 28), batchsize=16).compress()
    names = {c.name for c in s.selection.candidates}
    expected = {f"{b} {k}" for b in auto.candidate_backends() for k in ("quantized", "float")}
    assert names == expected
    chosen = next(c for c in s.selection.candidates if c.name == s.selection.chosen)
    fastest_float = min(c.milliseconds for c in s.selection.candidates if not c.quantized)
    assert chosen.milliseconds <= fastest_float
    assert s.engine.backend == chosen.backend
    assert str(s.selection) in str(s.report())
    with torch.no_grad():
        ref = model(x)
    assert float((s.inference(x)[0].argmax(1) == ref.argmax(1)).float().mean()) >= 0.9
