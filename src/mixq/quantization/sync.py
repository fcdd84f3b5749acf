"""Distributed QAT: all activation ranges of a model cross the ranks in one collective per training step.

Without this, every EMA observer all-reduces its batch range as it observes: about 80 small blocking
collectives per ResNet-18 step, each one a barrier between the ranks. With :func:`defer_range_sync` (which
``prepare_`` applies to QAT models under torch.distributed):

* during the forward each per-tensor EMA observer only records its batch's local (min, max);
* a hook after the model's forward packs them all into one tensor and starts one asynchronous all-reduce
  (MAX of ``[-min, max]``), which runs while the backward does;
* a hook before the next forward waits for it (on a GPU a stream wait, not a host sync) and takes one EMA step
  in every observer with the global batch's range.

Exactness: the max over ranks of the ranks' batch maxima is the global batch's max, and ``-max(-min)`` its min,
both exact in float32. Every rank applies the same reduced values with the same arithmetic
(:meth:`~mixq.observers.EMAMinMaxObserver.apply_global_range`'s), so observer states, and with them every
fake-quant grid, are bit-identical on all ranks at every step, and DDP's averaged gradient is the gradient of one
model. The price: the range a step quantizes with is the EMA up to the previous step (one batch late), and the
first training step of an activation runs unquantized, since there is no range yet.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import collective_device
from ..observers import EMAMinMaxObserver, ema_range_step

__all__ = ["RangeSync", "defer_range_sync", "sync_ranges", "undefer_range_sync_"]

_ATTRIBUTE = "_mixq_range_sync"


class RangeSync:
    """The deferred range all-reduce of one model's per-tensor EMA observers."""

    def __init__(self, observers: list[EMAMinMaxObserver]):
        self.observers = observers
        self._work = None
        self._packed: torch.Tensor | None = None

    def launch(self) -> None:
        """Start the all-reduce of the ranges recorded since the last launch (nothing recorded: nothing to do)."""
        recorded = [o.pending_range for o in self.observers]
        if all(r is None for r in recorded):
            return
        if self._packed is not None:  # two forwards without a sync in between: fold the first in before
            self.apply()
        device = next(r[0].device for r in recorded if r is not None)
        # An observer that saw no data on this rank adds nothing: its min +inf and its max -inf, neutral under
        # min and max. (torch.full: a fill on the device, where copying a host scalar could wait for the GPU.)
        if any(r is None for r in recorded):
            inf = torch.full((), math.inf, device=device)
            recorded = [r if r is not None else (inf, -inf) for r in recorded]
        packed = torch.cat([-torch.stack([r[0] for r in recorded]), torch.stack([r[1] for r in recorded])])
        for o in self.observers:
            o.pending_range = None
        packed = packed.to(collective_device())
        self._work = dist.all_reduce(packed, op=dist.ReduceOp.MAX, async_op=True)
        self._packed = packed

    def apply(self) -> None:
        """Wait for the all-reduce in flight and take one EMA step in every observer that some rank observed."""
        self._wait()
        if self._packed is None:
            return
        observers, packed = self.observers, self._packed
        self._packed = None
        device = observers[0].min_val.device
        n = len(observers)
        lo, hi = -packed[:n].to(device), packed[n:].to(device)
        seen = hi >= lo  # False only where no rank observed: min = +inf, max = -inf
        for decay, start, stop in self._decay_runs():
            group = observers[start:stop]
            g_lo, g_hi, g_seen = lo[start:stop], hi[start:stop], seen[start:stop]
            observed = torch.stack([o.observed for o in group])
            mins, maxs = torch.stack([o.min_val for o in group]), torch.stack([o.max_val for o in group])
            new_min, new_max = ema_range_step(mins, maxs, observed, g_lo, g_hi, decay)
            torch._foreach_copy_([o.min_val for o in group], list(torch.where(g_seen, new_min, mins).unbind(0)))
            torch._foreach_copy_([o.max_val for o in group], list(torch.where(g_seen, new_max, maxs).unbind(0)))
            torch._foreach_copy_([o.observed for o in group], list((observed | g_seen).unbind(0)))

    def _decay_runs(self) -> list[tuple[float, int, int]]:
        """(decay, start, stop) of each run of observers with one EMA decay: slices, so no gather is needed."""
        runs: list[tuple[float, int, int]] = []
        for i, o in enumerate(self.observers):
            if runs and runs[-1][0] == o.decay:
                runs[-1] = (o.decay, runs[-1][1], i + 1)
            else:
                runs.append((o.decay, i, i + 1))
        return runs

    def flush(self) -> None:
        """Apply everything recorded so far (collective: every rank must call it)."""
        self.launch()
        self.apply()

    def _wait(self) -> None:
        if self._work is not None:
            self._work.wait()  # the reduced ranges are now in self._packed
            self._work = None

    def __getstate__(self):
        # A Work handle can be neither copied nor pickled: wait for it; the reduced ranges travel as a tensor and
        # the copy applies them before its next forward, like the original (deepcopy may copy the observers
        # before this object, so applying here would reach the original only).
        self._wait()
        return {"observers": self.observers, "_work": None, "_packed": self._packed}


def defer_range_sync(model: nn.Module) -> RangeSync | None:
    """Sync the per-tensor EMA observers of a prepared ``model`` once per forward (see the module doc).

    ``prepare_`` calls this for QAT under torch.distributed; call it yourself when the process group is created
    after ``prepare_``. Per-channel activation observers keep syncing as they observe. Returns None when the
    model has nothing to defer.
    """
    if getattr(model, _ATTRIBUTE, None) is not None:
        return getattr(model, _ATTRIBUTE)
    observers = [m for m in model.modules() if isinstance(m, EMAMinMaxObserver) and not m.spec.per_channel]
    observers.sort(key=lambda o: o.decay)  # one run per decay (see RangeSync._decay_runs)
    if not observers:
        return None
    sync = RangeSync(observers)
    for o in observers:
        o.deferred_sync = True
    setattr(model, _ATTRIBUTE, sync)
    before, after = _hooks()
    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    return sync


def sync_ranges(model: nn.Module) -> None:
    """Bring every deferred observer of ``model`` up to date now (before reading or exporting its ranges)."""
    for sync in _syncs(model):
        sync.flush()


def undefer_range_sync_(model: nn.Module) -> None:
    """Flush and stop deferring (the model is being unwrapped)."""
    for sync in _syncs(model):
        sync.flush()
        for o in sync.observers:
            o.deferred_sync = False
    for m in model.modules():
        if getattr(m, _ATTRIBUTE, None) is not None:
            setattr(m, _ATTRIBUTE, None)  # the hooks find nothing and do nothing


def _syncs(model: nn.Module) -> list[RangeSync]:
    found = {id(s): s for m in model.modules() if (s := getattr(m, _ATTRIBUTE, None)) is not None}
    return list(found.values())


def _before_forward(module: nn.Module, args) -> None:
    sync = getattr(module, _ATTRIBUTE, None)
    if sync is not None:
        sync.apply()


def _after_forward(module: nn.Module, args, output) -> None:
    sync = getattr(module, _ATTRIBUTE, None)
    if sync is not None:
        sync.launch()


@functools.cache
def _hooks():
    # Collectives stay out of compiled graphs (torch.compile of a DDP model): the hooks always run eagerly.
    # Made once, on first use, so that importing mixq does not import torch._dynamo; named so that pickle
    # (torch.save of a whole model) finds them through the module's __getattr__ below.
    hooks = torch.compiler.disable(_before_forward), torch.compiler.disable(_after_forward)
    for hook, name in zip(hooks, _HOOK_NAMES, strict=True):
        hook.__name__ = hook.__qualname__ = name
    return hooks


_HOOK_NAMES = ("_before_forward_eager", "_after_forward_eager")


def __getattr__(name: str):
    if name in _HOOK_NAMES:
        return _hooks()[_HOOK_NAMES.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
