"""Observers: collect statistics of a tensor and turn them into a quantization range.

One protocol: ``observe(x)`` folds a batch in, ``range()`` gives the chosen (min, max), ``qparams()`` the
scale and zero point for the observer's spec, ``reset()`` forgets everything. Observers are
``nn.Module`` so their state lives in buffers and is saved/restored with a checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._errors import ConfigError
from .distributed import all_reduce_range, all_reduce_sum
from .primitives import choose_qparams, fake_quantize, tensor_range
from .spec import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "ema_range_step",
    "HistogramObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
]


class Observer(nn.Module):
    """Base class: subclasses implement ``observe`` and ``range``."""

    deferred_sync = False
    """True while ``observe`` only records the batch's range and the range moves at the next cross-rank sync
    (``mixq.distributed.defer_range_sync``): the range then lags the training step by one batch."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    @property
    def initialized(self) -> bool:
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool | torch.Tensor:
        """Whether there is a range to quantize with: a bool, or a device bool tensor where reading it back
        would stall the training loop."""
        return self.initialized

    def sync(self) -> None:
        """Merge this observer's statistics with the other ranks' (no-op when not distributed)."""

    def qparams(self, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            raise RuntimeError(f"{type(self).__name__} has observed no data yet")
        return choose_qparams(*self.range(), self.spec, check)


class MinMaxObserver(Observer):
    """Running min and max over everything observed (per channel where the spec says so)."""

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    @property
    def initialized(self) -> bool:
        return self.min_val.numel() > 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = tensor_range(x.float(), self.spec)
        if self.initialized:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo.clone(), hi.clone()

    def range(self):
        return self.min_val, self.max_val

    def reset(self):
        device = self.min_val.device
        self.min_val, self.max_val = torch.tensor([], device=device), torch.tensor([], device=device)

    def sync(self) -> None:
        """Merge with the other ranks (exact: the min of mins and the max of maxes)."""
        if self.initialized:
            self.min_val, self.max_val = all_reduce_range(self.min_val, self.max_val)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers start empty and take whatever shape the checkpoint has.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EMAMinMaxObserver(MinMaxObserver):
    """Exponential moving average of batch min/max (``decay`` 0.99 as in NNI's QAT); the first batch sets it.

    Built for the training loop: per-tensor state has a fixed shape from the start and "has it observed yet"
    is a device flag (``observed``), so ``observe`` and :meth:`ready` never read a value back to the host and a
    compiled model never recompiles on them.
    """

    def __init__(self, spec: QuantSpec, decay: float = 0.99):
        super().__init__(spec)
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.pending_range: tuple[torch.Tensor, torch.Tensor] | None = None  # deferred_sync only
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        if not spec.per_channel:  # per-channel state takes its shape from the first batch
            self.min_val, self.max_val = torch.zeros(()), torch.zeros(())

    @property
    def initialized(self) -> bool:
        return bool(self.observed)  # reads the device flag: for export and checks, not the training step

    def ready(self) -> torch.Tensor:
        return self.observed

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.fold_range(*(t.float() for t in tensor_range(x, self.spec)))

    @torch.no_grad()
    def fold_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fold one batch's float32 (min, max) into the EMA.

        Under torch.distributed every rank folds in the range of the global batch, so the EMA (and the exported
        config) is identical on all ranks: with :attr:`deferred_sync` the range is only recorded here and all
        recorded ranges of the model cross the ranks in one collective after the forward
        (``mixq.quantization.sync``); otherwise it is all-reduced now, one collective per call.
        """
        if self.deferred_sync:
            pending = self.pending_range
            self.pending_range = (lo, hi) if pending is None else (pending[0].minimum(lo), pending[1].maximum(hi))
            return
        self.apply_global_range(*all_reduce_range(lo, hi))

    @torch.no_grad()
    def apply_global_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """One EMA step with a range every rank agrees on (the first one sets the state)."""
        if self.min_val.shape != lo.shape:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        new_min, new_max = ema_range_step(self.min_val, self.max_val, self.observed, lo, hi, self.decay)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        self.observed.fill_(True)

    def reset(self):
        super().reset()
        self.pending_range = None
        self.observed.fill_(False)
        if not self.spec.per_channel:
            device = self.observed.device
            self.min_val, self.max_val = torch.zeros((), device=device), torch.zeros((), device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "observed" not in state_dict and prefix + "min_val" in state_dict:  # saved before the flag
            state_dict[prefix + "observed"] = torch.tensor(state_dict[prefix + "min_val"].numel() > 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def ema_range_step(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    observed: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of a tracked range with a batch's (lo, hi); where nothing was observed yet, the batch's range.
    Element-wise, so one observer's state and a stack of many observers' (mixq.quantization.sync) take the same
    arithmetic."""
    new_min = torch.where(observed, decay * min_val + (1 - decay) * lo, lo)
    new_max = torch.where(observed, decay * max_val + (1 - decay) * hi, hi)
    return new_min, new_max


class HistogramObserver(Observer):
    """Histogram of all observed values over a range that widens as data arrives.

    When a batch falls outside the current range, the old counts are moved into the wider bins by their
    bin centres (the usual approximation, also used by torch and ONNX Runtime calibrators); ranges never
    shrink. Subclasses choose the clipping range from the histogram. Per-tensor only.
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        super().__init__(spec)
        if spec.per_channel:
            raise ConfigError(
                f"{type(self).__name__} supports per-tensor specs only; use 'minmax' or 'ema' for per-channel"
            )
        self.bins = bins
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("hi", torch.tensor(-math.inf, dtype=torch.float64))
        self.range_only = False  # first pass of a two-pass calibration: track min/max, no histogram
        self.fixed = False  # second pass: the range is fixed, counts simply add up

    @property
    def initialized(self) -> bool:
        return bool(self.hist.sum() > 0)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64).cpu()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__} observed NaN or infinite values")
        if self.range_only:
            self.lo.fill_(min(float(self.lo), float(x.min()), 0.0))
            self.hi.fill_(max(float(self.hi), float(x.max()), 0.0))
            return
        if self.fixed:
            self.hist += torch.histogram(
                x.clamp(float(self.lo), float(self.hi)), bins=self.bins, range=(float(self.lo), float(self.hi))
            ).hist
            return
        lo = min(float(self.lo), float(x.min()), 0.0)
        hi = max(float(self.hi), float(x.max()), 0.0)
        if hi == lo:
            hi = lo + 1e-12
        if self.initialized and (lo < float(self.lo) or hi > float(self.hi)):
            self._rebin(lo, hi)
        self.lo.fill_(lo)
        self.hi.fill_(hi)
        self.hist += torch.histogram(x, bins=self.bins, range=(lo, hi)).hist

    def reset(self):
        self.hist.zero_()
        self.lo.fill_(math.inf)
        self.hi.fill_(-math.inf)
        self.range_only = self.fixed = False

    def fix_range(self) -> None:
        """End the range pass: agree on the global range across ranks and count into fixed bins from now on.
        With the range fixed before any counting, the histogram no longer depends on batch order or on how
        the data is sharded, so merged counts equal a single process's exactly."""
        lo, hi = all_reduce_range(self.lo, self.hi)
        self.lo.copy_(lo)
        self.hi.copy_(hi if float(hi) > float(lo) else lo + 1e-12)
        self.hist.zero_()
        self.range_only, self.fixed = False, True

    def sync(self) -> None:
        """Merge with the other ranks: exact for fixed-range histograms (counts add up); otherwise each rank's
        counts are first moved into the common range by bin centre (the usual approximation)."""
        lo, hi = all_reduce_range(self.lo, self.hi)
        if not self.fixed and (float(lo) < float(self.lo) or float(hi) > float(self.hi)) and self.initialized:
            self._rebin(float(lo), float(hi))
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        self.hist = all_reduce_sum(self.hist)

    def bin_centers(self) -> torch.Tensor:
        edges = torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)
        return (edges[:-1] + edges[1:]) / 2

    def _rebin(self, lo: float, hi: float) -> None:
        """Move the counts into ``bins`` bins over the wider range [lo, hi], each by its bin centre."""
        self.hist = torch.histogram(self.bin_centers(), bins=self.bins, range=(lo, hi), weight=self.hist).hist

    def range(self):
        return self.lo.float(), self.hi.float()

    def _clip(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The observed range clipped symmetrically at magnitude ``t``."""
        return torch.tensor(max(float(self.lo), -t)), torch.tensor(min(float(self.hi), t))


class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile`` (and ``100 - percentile``) of the observed values."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048):
        super().__init__(spec, bins)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self):
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        edges = torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)
        q = self.percentile / 100.0
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(1 - q, dtype=torch.float64)))
        return edges[lo_idx].float(), edges[min(hi_idx + 1, self.bins)].float()


ENTROPY_FP8_ERROR = (
    "the entropy observer models evenly spaced integer levels, which fp8 does not have; "
    "use 'minmax', 'ema', 'percentile' or 'mse' for fp8"
)


class EntropyObserver(HistogramObserver):
    """Clip where the KL divergence between the clipped and the quantized distribution is smallest.

    TensorRT's entropy calibration, generalised: it works on the histogram of ``|x|`` and the number of
    quantization levels the spec has on the positive side (all of them for non-negative data with an
    affine spec, half otherwise). Those levels are evenly spaced: integer specs only (fp8's are not).
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        if spec.is_float:
            raise ConfigError(ENTROPY_FP8_ERROR)
        super().__init__(spec, bins)

    def range(self):
        centers, counts = self.bin_centers(), self.hist
        amax = max(-float(self.lo), float(self.hi))
        abs_hist = torch.histogram(centers.abs(), bins=self.bins, range=(0.0, amax), weight=counts).hist
        levels = self._positive_levels()
        best_t, best_kl = amax, math.inf
        start = min(levels, self.bins)
        for i in range(start, self.bins + 1, max(1, (self.bins - start) // 256)):
            kl = _kl_of_clipping(abs_hist, i, levels)
            if kl < best_kl:
                best_kl, best_t = kl, amax * i / self.bins
        return self._clip(best_t)

    def _positive_levels(self) -> int:
        dt = self.spec.dtype
        if float(self.lo) >= 0 and not self.spec.symmetric:
            return dt.qmax - dt.qmin + 1
        return (dt.qmax - dt.qmin + 1) // 2


def _kl_of_clipping(hist: torch.Tensor, i: int, levels: int) -> float:
    """KL(P || Q) for clipping ``hist`` after ``i`` bins (the method of TensorRT, MXNet and ONNX Runtime)."""
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    nonzero = hist[:i] > 0
    # Merge the i bins into `levels` groups, then spread each group's mass over its non-empty bins.
    group = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
    mass = torch.zeros(levels, dtype=p.dtype).index_add_(0, group, hist[:i])
    count = torch.zeros(levels, dtype=p.dtype).index_add_(0, group, nonzero.to(p.dtype))
    q = torch.where(nonzero, mass[group] / count[group].clamp(min=1), torch.zeros_like(p))
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None:
        return math.inf
    return float((p * torch.log(p / q)).sum())


def _smooth(d: torch.Tensor, eps: float = 1e-4) -> torch.Tensor | None:
    """Normalise and move ``eps`` of mass into empty bins so the KL divergence is finite."""
    total = d.sum()
    if total <= 0:
        return None
    d = d / total
    zero = d == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_zero == 0:
        return d
    return torch.where(zero, torch.full_like(d, eps), d - eps * n_zero / n_nonzero).clamp(min=1e-12)


class MSEObserver(HistogramObserver):
    """Clip at the magnitude that minimises the histogram-weighted squared quantization error."""

    def __init__(self, spec: QuantSpec, bins: int = 2048, candidates: int = 100):
        super().__init__(spec, bins)
        self.candidates = candidates

    def range(self):
        centers, counts = self.bin_centers(), self.hist
        amax = max(-float(self.lo), float(self.hi))
        best_t, best_err = amax, math.inf
        for k in range(1, self.candidates + 1):
            t = amax * k / self.candidates
            lo, hi = self._clip(t)
            scale, zp = choose_qparams(lo, hi, self.spec)
            err = float((counts * (fake_quantize(centers, scale, zp, self.spec.dtype) - centers) ** 2).sum())
            if err < best_err:
                best_err, best_t = err, t
        return self._clip(best_t)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, spec: QuantSpec) -> Observer:
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; expected one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](spec)
