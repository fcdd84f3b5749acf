"""Hardware-aware mixed-precision search: the fastest configuration that keeps accuracy, measured on the
real engines.

    result = mixq.search(model, calib_loader, eval_fn, budget=0.5)      # at most 0.5 points of drop
    result.config_list, result.backend, result.engine, result.report
    result.save("runs/search")                                          # config, tables, plot, engine

Sensitivity comes from PTQ on ``calib_loader`` (a cheap proxy ranks the layers, the promising ones are
measured with ``eval_fn``), latency from each candidate backend's profiler, the assignment from an exact
solver (greedy for large models), and the answer from building and verifying the finalists end to end.
It never returns a configuration slower than the fastest float engine. The procedure: :mod:`.run`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .._errors import ConfigError
from .cache import CachedMeasurer, DiskCache, default_cache_dir
from .measure import EngineMeasurer, Measurer, _machine
from .result import SearchResult
from .run import Budget, Evaluated, Outcome, as_budget, run_search
from .space import CHOICES, NOT_EXPRESSIBLE, Unit, check_choices, config_list_for, find_units

__all__ = [
    "search",
    "Budget",
    "SearchResult",
    "Outcome",
    "Evaluated",
    "Measurer",
    "run_search",
    "CHOICES",
    "NOT_EXPRESSIBLE",
    "Unit",
    "find_units",
    "config_list_for",
    "check_choices",
    "DEFAULT_CHOICES",
    "EngineMeasurer",
    "agreement_metric",
]

DEFAULT_CHOICES = ("fp32", "fp16", "int8", "fp8")
_DEFAULT_CACHE = object()


def _batches(calib_loader) -> list[torch.Tensor]:
    """The calibration batches as CPU float tensors (a DataLoader, an iterable of tensors or (input, label)
    pairs, or one tensor split into batches of 64), read once; every batch shaped like the first."""
    if isinstance(calib_loader, torch.Tensor):
        calib_loader = torch.split(calib_loader, 64)
    if calib_loader is None or not isinstance(calib_loader, Iterable):
        raise ConfigError(
            f"calib_loader must be a DataLoader, an iterable of batches or a tensor, got {type(calib_loader).__name__}"
        )
    out = []
    for i, batch in enumerate(calib_loader):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"calib_loader batch {i}: expected a float tensor (batch, ...), got {got}")
        if out and x.shape[1:] != out[0].shape[1:]:
            raise ConfigError(
                f"calib_loader batch {i}: samples shaped {tuple(x.shape[1:])}, batch 0 has {tuple(out[0].shape[1:])}"
            )
        out.append(x.detach().float().cpu().contiguous())
    if not out:
        raise ConfigError("calib_loader gave no batches")
    return out


def agreement_metric(model: nn.Module, batches: list[torch.Tensor]) -> Callable:
    """The default metric: top-1 agreement (%) with ``model``'s outputs on ``batches``."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    with torch.no_grad():
        refs = [model.eval()(b.to(device)).argmax(1).cpu() for b in batches]

    def top1_agreement_with_float_model(predict) -> float:
        same = sum(int((predict(b).argmax(1) == r).sum()) for b, r in zip(batches, refs, strict=True))
        return 100.0 * same / sum(len(r) for r in refs)

    return top1_agreement_with_float_model


def _backends(backends, model: nn.Module) -> list[str]:
    from ..auto import candidate_backends
    from ..backends import get_backend

    if backends == "auto":
        on_cuda = any(t.is_cuda for t in (*model.parameters(), *model.buffers()))
        return candidate_backends(on_cuda)
    names = [backends] if isinstance(backends, str) else list(backends)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"backends must be 'auto', a backend name or a list of names, got {backends!r}")
    for n in names:
        get_backend(n)  # unknown or unusable here: the error names it
    return list(dict.fromkeys(names))


def _positive(name: str, value, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def _logger(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda text: print(f"search: {text}", file=sys.stderr, flush=True)
    return lambda _text: None


def search(
    model: nn.Module,
    calib_loader,
    eval_fn: Callable | None = None,
    *,
    budget: float | Budget = 0.5,
    backends: str | Sequence[str] = "auto",
    choices: Sequence[str] = DEFAULT_CHOICES,
    verify_fn: Callable | None = None,
    batch: int | None = None,
    finalists: int = 3,
    max_measured: int | None = None,
    exact_limit: int = 100_000,
    runs: int = 20,
    profile_runs: int = 10,
    proxy_samples: int = 64,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = _DEFAULT_CACHE,
    finetune: Callable | None = None,
    progress: bool | Callable[[str], None] = True,
) -> SearchResult:
    """Search the per-layer precision of ``model`` (float, eval mode) for the fastest engine within
    ``budget``, measured on this machine's backends.

    ``calib_loader``: calibration batches (DataLoader, iterable of tensors or (input, label) pairs, or one
    tensor), used for PTQ, the proxy, and latency at ``batch`` (default: the first batch's size).
    ``eval_fn(predict) -> float``: the metric, higher is better; ``predict`` maps a batch of inputs to
    outputs (CPU tensors); it is the fake-quant model during the search. Default: top-1 agreement (%) with
    the float model on the calibration batches. ``verify_fn``: the same kind of function on held-out data,
    run on the real engines of the finalists (default: ``eval_fn``).
    ``budget``: the largest allowed drop of the metric (a number, default 0.5 points) or
    ``Budget(latency_ms=...)`` for the most accurate configuration within a latency target.
    ``backends``: ``"auto"`` (every usable backend: the CPU ones, GPU ones for a CUDA model) or names.
    ``choices``: precisions to consider; the search checks which each backend really runs (see notes).
    ``finalists``: plans per backend built and verified; ``max_measured``: at most this many layer options
    get a measured metric (the rest are predicted from the proxy); ``exact_limit``: states of the exact
    solver before it falls back to greedy. ``runs``/``profile_runs``: timed runs per engine/profile.
    ``cache_dir``: where measurements are kept so reruns resume (default ``~/.cache/mixq/search``; None:
    memory only). ``finetune(model, config_list) -> model``: optional QAT of the winner (return the model
    prepared with the config_list and trained, e.g. with ``QAT_Quantizer``); kept if it verifies better.
    ``progress``: True prints progress lines on stderr; or a callable taking each line.
    """
    from ..quantization import quantized_layers

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if quantized_layers(model):
        raise ConfigError("model is already prepared for quantization; pass the float model (the search quantizes)")
    for name, fn in (("eval_fn", eval_fn), ("verify_fn", verify_fn), ("finetune", finetune)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be callable, got {type(fn).__name__}")
    budget = as_budget(budget)
    check_choices(choices)  # names checked before anything is built
    _positive("batch", batch, allow_none=True)
    for name, value in (("finalists", finalists), ("exact_limit", exact_limit), ("runs", runs)):
        _positive(name, value)
    _positive("profile_runs", profile_runs)
    _positive("proxy_samples", proxy_samples)
    _positive("max_measured", max_measured, allow_none=True, minimum=0)
    _positive("threads", threads, allow_none=True)
    names = _backends(backends, model)
    kept, left_out = check_choices(choices, names)
    batches = _batches(calib_loader)
    model = model.eval()
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    try:
        with torch.no_grad():
            model(batches[0][:1].to(device))
    except Exception as e:
        shape = tuple(batches[0].shape[1:])
        raise ConfigError(f"model fails on a calibration sample shaped {shape}: {type(e).__name__}: {e}") from e
    log = _logger(progress)
    for c, why in left_out.items():
        log(f"{c}: left out: {why}")
    units = find_units(model, batches[0][:1].to(device))
    eval_fn = eval_fn or agreement_metric(model, batches)
    verify_fn = verify_fn or eval_fn
    batch = batch or len(batches[0])
    real = EngineMeasurer(
        model, batches, units, names, eval_fn, verify_fn, batch, runs, profile_runs, proxy_samples, threads, kept
    )
    folder = default_cache_dir() if cache_dir is _DEFAULT_CACHE else cache_dir
    cache = DiskCache(None if folder is None else os.path.join(folder, f"{real.fingerprint('engine')[:20]}.json"))
    measurer = CachedMeasurer(real, cache)
    log(f"{len(units)} layers to decide, choices {list(kept)}, backends {names}, batch {batch}")
    if cache.data:
        log(f"resuming: {len(cache.data)} measurements in {cache.path}")
    outcome = run_search(measurer, budget, kept, finalists, max_measured, exact_limit, log)
    outcome = dataclasses.replace(outcome, notes=tuple(f"{c}: {w}" for c, w in left_out.items()) + outcome.notes)
    log(f"{measurer.hits} measurements from the cache, {measurer.misses} new")
    return _result(real, outcome, units, batch, finetune, log)


def _result(real: EngineMeasurer, outcome: Outcome, units, batch, finetune, log) -> SearchResult:
    """Build the winner (and fine-tune it when asked) and wrap it up."""
    w = outcome.winner
    assignment = dict(zip((u.name for u in units), w.assignment, strict=True))
    config_list = config_list_for(units, assignment)
    speedup = real.speedup(w.backend, w.assignment)
    model = real.quantized_model(w.assignment)
    tuned_row, kept = None, False
    if finetune is not None and w.quantized:
        log(f"QAT fine-tune of the winner ({w.label}) on {w.backend}")
        tuned, tuned_speedup, tuned_row = _finetune(real, finetune, config_list, w)
        kept = tuned_row.metric >= w.metric and tuned_row.ratio < 1
        if kept:
            model, speedup = tuned, tuned_speedup
        else:
            log(f"fine-tuned engine verified {tuned_row.metric:.4g} vs {w.metric:.4g} (PTQ): keeping the PTQ model")
    log(f"placement report of the winner on {w.backend}")
    report = speedup.report(compare_float=w.quantized, runs=real.profile_runs)
    return SearchResult(
        config_list,
        w.backend,
        assignment,
        tuple(units),
        outcome,
        model,
        speedup.engine,
        speedup,
        report,
        batch,
        finetuned=tuned_row,
        finetune_kept=kept,
        machine=_machine(),
    )


def _finetune(real: EngineMeasurer, finetune: Callable, config_list: list, w: Evaluated):
    from ..quantization import quantized_layers
    from ..speedup import ModelSpeedup

    tuned = finetune(copy.deepcopy(real.model).train(), copy.deepcopy(config_list))
    if not isinstance(tuned, nn.Module) or not quantized_layers(tuned):
        raise ConfigError(
            "finetune must return the model prepared with the given config_list and trained "
            "(e.g. mixq.quantize(model, config_list, method=mixq.QAT()) then your training loop)"
        )
    tuned.eval()
    s = ModelSpeedup(
        tuned,
        real.input_shape,
        batchsize=real.batch,
        backend=w.backend,
        calib_data_loader=real.batches,
        threads=real.threads,
    ).compress()
    floats = [real.speedup(b, real.float_assignment).engine for b in real.backends()]
    times = real.time_engines([s.engine, *floats], scale=2)
    metric = float(real.verify_fn(s.engine.run))
    ref = real.reference()["verify"]
    row = Evaluated(
        f"{w.label.removesuffix(' (confirm)')} + QAT fine-tune",
        w.backend,
        w.assignment,
        times[0],
        min(times[1:]),
        metric,
        ref - metric,
    )
    return tuned, s, row
