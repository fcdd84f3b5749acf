"""Model level, the native API's verbs: prepare a model for QAT/PTQ/LSQ/DoReFa, calibrate it, export its
calibration config.

    specs = mixq.prepare_(model, config_list, mixq.QAT(), example_input=x)   # wraps configured modules
    ... train with your own loop ...
    calib = mixq.export_calibration(model)       # JSON-serializable dict keyed by module name
    deploy = mixq.deploy_model(model)             # float model, BN folded, original module names
    mixq.load_calibration_(model, calib)          # ranges back from a calibration config (NNI's load)

Each configured module is replaced by one :class:`QuantWrapper` (no wrapper towers); with an example input,
a BatchNorm that directly follows a configured conv moves into that conv's wrapper and is folded.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .._errors import ConfigError, ModelStructureError
from ..attention import explicit_attention_
from ..config import check_config_list, resolve_config
from ..distributed import broadcast_, is_distributed
from ..observers import HistogramObserver
from ..primitives import SCALE_EPS
from ..spec import SECOND_INPUT, LayerSpec
from .fake_quant import ActivationQuant, LSQActivationQuant, check_integer_method
from .sync import defer_range_sync, sync_ranges, undefer_range_sync_
from .wrapper import LSQ, QAT, DoReFa, Method, Mode, QuantWrapper

__all__ = [
    "prepare_",
    "calibrate_",
    "freeze_",
    "quantized_layers",
    "export_calibration",
    "deploy_model",
    "deploy_",
    "load_calibration_",
    "find_conv_bn_pairs",
]

DEFAULT_METHOD = QAT()


def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{conv_name: bn_name}`` for each BatchNorm whose only input is a conv used nowhere else (torch.fx)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}  # nothing to fold; models fx cannot trace (torchvision's ViT: torch._assert on shapes) need not be
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable code
        raise ModelStructureError(
            f"cannot trace {type(model).__name__} to find Conv->BatchNorm pairs for folding ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass example_input=None (dummy_input=None in mixq.nni) "
            "to quantize without BN folding"
        ) from e
    modules = dict(model.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0] if node.args else None
        if (
            isinstance(prev, torch.fx.Node)
            and prev.op == "call_module"
            and isinstance(modules.get(prev.target), nn.Conv1d | nn.Conv2d)
            and len(prev.users) == 1
        ):
            pairs[prev.target] = node.target
    return pairs


def prepare_(
    model: nn.Module,
    config: Sequence[Mapping] | Mapping[str, LayerSpec],
    method: Method = DEFAULT_METHOD,
    example_input: torch.Tensor | None = None,
) -> dict[str, LayerSpec]:
    """Replace each configured module of ``model`` (in place) by a :class:`QuantWrapper`.

    ``config`` is an NNI ``config_list`` or already-resolved specs. With ``example_input`` given, each
    BatchNorm directly after a configured conv is folded into it. Every ``nn.MultiheadAttention`` is first
    replaced by :class:`mixq.attention.ExplicitMultiheadAttention` (same function and weights; projections
    ``<attn>.in_proj`` and ``<attn>.out_proj`` as ``nn.Linear``). Returns the resolved specs.
    """
    if any(isinstance(m, QuantWrapper) for m in model.modules()):
        raise ModelStructureError(f"{type(model).__name__} is already prepared for quantization")
    # nn.MultiheadAttention -> ExplicitMultiheadAttention (same function): its projections become Linear layers
    # a wrapper can replace, and torch's fused fast path (which reads out_proj.weight) is no longer taken.
    explicit_attention_(model)
    if isinstance(config, Mapping) and (not config or not all(isinstance(v, LayerSpec) for v in config.values())):
        check_config_list(config)  # a bare config_list entry or a calibration config: the error says which
    specs = dict(config) if isinstance(config, Mapping) else resolve_config(model, config)
    modules = dict(model.named_modules())
    missing = [name for name in specs if name not in modules]
    if missing:
        raise ConfigError(
            f"the layer specs name {', '.join(repr(n) for n in missing[:4])}"
            f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}, which {type(model).__name__} lacks"
        )
    if isinstance(method, LSQ | DoReFa):
        for name, spec in specs.items():
            for t in spec.quant_types:
                check_integer_method(spec.spec(t), type(method).__name__, f"layer {name!r} ({t})")
    pairs = find_conv_bn_pairs(model) if example_input is not None else {}
    folded = {conv: bn for conv, bn in pairs.items() if conv in specs}
    for conv, bn in folded.items():
        if bn in specs:
            raise ConfigError(f"BatchNorm {bn!r} is folded into {conv!r} and cannot be quantized on its own")
        if not modules[bn].track_running_stats or not modules[bn].affine:
            raise ModelStructureError(
                f"BatchNorm {bn!r} needs running statistics and affine=True to be folded into {conv!r}; "
                "pass example_input=None (dummy_input=None in mixq.nni) to quantize without folding"
            )
    model_device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
    for name, spec in specs.items():
        bn_name = folded.get(name)
        wrapper = QuantWrapper(modules[name], spec, method, modules[bn_name] if bn_name else None, bn_name)
        # New observer/step buffers go where the layer lives (a model moved to CUDA before prepare_); layers
        # without state (ReLU, pools) follow the model.
        device = next((t.device for t in (*modules[name].parameters(), *modules[name].buffers())), model_device)
        if device is not None:
            wrapper.to(device)
        model.set_submodule(name, wrapper)
        if bn_name:
            model.set_submodule(bn_name, nn.Identity())
    if isinstance(method, QAT) and is_distributed():
        defer_range_sync(model)  # one range all-reduce per step instead of one per observer
    return specs


def quantized_layers(model: nn.Module) -> dict[str, QuantWrapper]:
    """``{name: QuantWrapper}`` for every layer of ``model`` that ``prepare_`` wrapped (names as in
    ``model.named_modules()``; empty for a model that was never prepared)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantWrapper)}


def _wrappers_or_error(model: nn.Module) -> dict[str, QuantWrapper]:
    wrappers = quantized_layers(model)
    if not wrappers:
        raise ModelStructureError(f"{type(model).__name__} has no quantized layers; call mixq.prepare_ first")
    return wrappers


def calibrate_(model: nn.Module, forward_loop: Callable[[nn.Module], object]) -> nn.Module:
    """PTQ: run ``forward_loop(model)`` in eval mode without gradients while observers collect ranges,
    then freeze the ranges and switch to quantized execution.

    With histogram observers (percentile, entropy, mse) the loop runs twice: once to find the range, once to
    count into fixed bins, so the result does not depend on batch order. Under torch.distributed each rank
    runs the loop over its own shard (the same number of batches on every rank) and the statistics are
    merged exactly: the result equals one process calibrating on all shards.
    """
    wrappers = _wrappers_or_error(model)
    histograms = [o for o in _activation_observers(wrappers) if isinstance(o, HistogramObserver)]
    was_training = model.training
    for w in wrappers.values():
        w.mode = Mode.CALIBRATE
    model.eval()
    try:
        with torch.no_grad():
            for o in histograms:
                o.reset()
                o.range_only = True
            forward_loop(model)
            if histograms:
                for o in histograms:
                    o.fix_range()
                forward_loop(model)
    finally:
        model.train(was_training)
    return freeze_(model)


# The activation quantizers of a wrapper (attribute ``<slot>_quantizer``) and their calibration-entry keys.
ACTIVATION_SLOTS = ("input", SECOND_INPUT, "output")


def _activation_observers(wrappers: dict) -> list:
    return [
        q.observer
        for w in wrappers.values()
        for q in (w.input_quantizer, w.input1_quantizer, w.output_quantizer)
        if isinstance(q, ActivationQuant)
    ]


def freeze_(model: nn.Module, allow_unobserved: bool = False) -> nn.Module:
    """Switch every wrapper to quantized execution. Observers that were calibrating merge their statistics
    across ranks first (torch.distributed).

    An activation never observed is an error naming it when no activation was observed at all (no
    calibration data yet) unless ``allow_unobserved``; otherwise (a module the config names but ``forward``
    never calls) a warning names it and it stays float."""
    wrappers = _wrappers_or_error(model)
    sync_ranges(model)
    calibrating = {n: w for n, w in wrappers.items() if w.mode is Mode.CALIBRATE}
    for observer in _activation_observers(calibrating):
        observer.sync()
    _check_observed(wrappers, allow_unobserved, "run calibration batches through the model first")
    for w in wrappers.values():
        w.mode = Mode.QUANTIZE
    return model


def _unobserved(wrappers: dict[str, QuantWrapper]) -> list[tuple[str, str]]:
    """(layer, quant type) of every activation quantizer that has seen no data."""
    return [
        (name, t)
        for name, w in wrappers.items()
        for t in ACTIVATION_SLOTS
        if getattr(w, f"{t}_quantizer") is not None and not getattr(w, f"{t}_quantizer").initialized
    ]


def _slot_name(slot: str) -> str:
    return "second input" if slot == SECOND_INPUT else slot


def _check_observed(wrappers: dict[str, QuantWrapper], allow_unobserved: bool, fix: str) -> list[tuple[str, str]]:
    missing = _unobserved(wrappers)
    if not missing:
        return missing
    activations = sum(getattr(w, f"{t}_quantizer") is not None for w in wrappers.values() for t in ACTIVATION_SLOTS)
    if len(missing) == activations and not allow_unobserved:
        name, t = missing[0]
        raise ModelStructureError(f"layer {name!r}: its {_slot_name(t)} was never observed; {fix}")
    shown = ", ".join(f"{n!r} ({_slot_name(t)})" for n, t in missing[:6]) + (
        f" and {len(missing) - 6} more" if len(missing) > 6 else ""
    )
    why = "no data has been run through the model yet" if len(missing) == activations else "forward never calls them?"
    warnings.warn(f"never observed ({why}): {shown}; these activations stay float", stacklevel=3)
    return missing


def export_calibration(model: nn.Module, allow_unobserved: bool = False) -> dict:
    """The calibration config: ``{module_name: {...}}``, JSON-serializable.

    Activations never observed are treated as in :func:`freeze_` and left out (a layer with nothing left is
    left out too).

    Each entry has NNI's keys (``weight_bits``, ``weight_scale``, ``weight_zero_point``, ``input_bits``,
    ``tracked_min_input``, ``tracked_max_input``, ``output_bits``, ``tracked_min_output``,
    ``tracked_max_output``) for the quantized types, plus what an engine needs to rebuild the exact
    qparams: ``<type>_qspec`` (bits, dtype, scheme, axis), ``input_scale``/``input_zero_point`` and
    ``output_scale``/``output_zero_point``, ``op_type`` and ``folded_bn``.
    """
    out = {}
    wrappers = _wrappers_or_error(model)
    sync_ranges(model)
    unobserved = set(_check_observed(wrappers, allow_unobserved, "train or calibrate before exporting"))
    for w in wrappers.values():
        if w.bn is not None:
            # DDP refreshes BatchNorm statistics from rank 0 at the start of each forward, so after the last
            # training step ranks differ; fold rank 0's, as the next forward would, so every rank agrees.
            broadcast_(w.bn.running_mean)
            broadcast_(w.bn.running_var)
    for name, w in wrappers.items():
        spec = w.layer_spec
        entry: dict = {"op_type": spec.op_type}
        if w.bn_name:
            entry["folded_bn"] = w.bn_name
        if spec.weight is not None:
            weight, _ = w.folded_weight_and_bias()
            scale, zp = w.weight_quantizer.qparams(weight.detach())
            stored = w.weight_quantizer.export_spec()  # DoReFa: k+1 bits hold its k-bit levels exactly
            entry["weight_bits"] = stored.dtype.bits
            entry["weight_scale"] = _py(scale)
            entry["weight_zero_point"] = _py(zp)
            entry["weight_qspec"] = stored.to_dict()
        if {(name, SECOND_INPUT), (name, "input")} & unobserved:  # a MatMul's operands: both or neither
            unobserved |= {(name, SECOND_INPUT), (name, "input")}
        for t in ACTIVATION_SLOTS:
            q = getattr(w, f"{t}_quantizer")
            if q is None or (name, t) in unobserved:
                continue
            lo, hi = q.tracked_range()
            scale, zp = q.qparams()
            entry[f"tracked_min_{t}"] = lo
            entry[f"tracked_max_{t}"] = hi
            entry[f"{t}_scale"] = _py(scale)
            entry[f"{t}_zero_point"] = _py(zp)
            if t != SECOND_INPUT:  # the second operand shares the input's bits and qspec
                entry[f"{t}_bits"] = spec.spec(t).dtype.bits
                entry[f"{t}_qspec"] = spec.spec(t).to_dict()
        if any(f"{t}_bits" in entry for t in ("input", "weight", "output")):
            out[name] = entry
    return out


def _py(t: torch.Tensor):
    t = t.detach().cpu()
    return t.item() if t.numel() == 1 and t.dim() == 0 else t.tolist()


def deploy_model(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` with every wrapper replaced by its original module carrying the deploy
    weights (BN folded, DoReFa applied). A folded BatchNorm goes back to its place as an identity
    (weight 1, mean 0, variance 1 - eps) holding the folded bias, so the copy loads into the original
    architecture and computes what the quantized engine computes, in float."""
    return deploy_(copy.deepcopy(model))


def deploy_(model: nn.Module) -> nn.Module:
    """:func:`deploy_model` in place: ``model`` gets its plain modules back (NNI's ``export_model`` unwraps
    the model it quantized)."""
    undefer_range_sync_(model)
    for name, w in quantized_layers(model).items():
        module = w.module
        if w.layer_spec.weight is not None or w.bn is not None:
            weight, bias = w.deploy_weight_and_bias()
            with torch.no_grad():
                module.weight.copy_(weight)
                if w.bn is None:
                    if module.bias is not None:
                        module.bias.copy_(bias)
                else:
                    if module.bias is not None:
                        module.bias.zero_()
                    _make_identity_bn(w.bn, bias)
        model.set_submodule(name, module)
        if w.bn is not None:
            model.set_submodule(w.bn_name, w.bn)
    return model


def load_calibration_(model: nn.Module, calibration: Mapping) -> list[str]:
    """Set the activation ranges of a prepared model from a calibration config (NNI's
    ``quantizer.load_calibration_config``): each input/output range the config gives (``tracked_min_*`` /
    ``tracked_max_*``) becomes the quantizer's range, as if observed (QAT's EMA continues from it; LSQ's
    step size starts from it). Weights keep following their own values. Returns the layers the config lacks.

    Errors name a layer whose bits differ from its spec. Histogram observers (percentile, entropy, mse) choose
    ranges from data and cannot take one; the error says so."""
    from ..calibration import normalize_calibration_config

    calibration = normalize_calibration_config(calibration)
    wrappers = _wrappers_or_error(model)
    sync_ranges(model)  # a range update still in flight would land on top of the loaded ranges
    missing = []
    for name, w in wrappers.items():
        entry = calibration.get(name)
        if entry is None:
            missing.append(name)
            continue
        for t in w.layer_spec.quant_types:
            bits = w.layer_spec.spec(t).dtype.bits
            if f"{t}_bits" in entry and entry[f"{t}_bits"] != bits:
                raise ConfigError(
                    f"load_calibration_config: layer {name!r}: {t}_bits {entry[f'{t}_bits']} in the config, "
                    f"{bits} in this quantizer's config_list"
                )
        for t in ACTIVATION_SLOTS:
            q = getattr(w, f"{t}_quantizer")
            if q is None or f"tracked_min_{t}" not in entry:
                continue
            _set_range(q, float(entry[f"tracked_min_{t}"]), float(entry[f"tracked_max_{t}"]), f"{name!r} ({t})")
    return missing


def _set_range(q: nn.Module, lo: float, hi: float, where: str) -> None:
    if isinstance(q, LSQActivationQuant):
        dt, zp = q.spec.dtype, int(q.zero_point)
        # LSQ's zero point is fixed: the step size that reaches both ends of [lo, hi] from it.
        steps = [hi / (dt.qmax - zp)] + ([lo / (dt.qmin - zp)] if dt.qmin < zp else [])
        state = q.state_dict()
        state["scale"] = torch.tensor(max(*steps, SCALE_EPS), dtype=state["scale"].dtype)
        state["_initialized"] = torch.tensor(True)
        q.load_state_dict(state)
        return
    observer = q.observer
    if isinstance(observer, HistogramObserver):
        raise ConfigError(
            f"load_calibration_config: layer {where} uses the {type(observer).__name__}, which chooses its range "
            "from data; use observer 'minmax' or 'ema' to start from a calibration config"
        )
    observer.reset()
    observer.observe(torch.tensor([lo, hi], device=_device_of(observer)))


def _device_of(module: nn.Module) -> torch.device:
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def _make_identity_bn(bn: nn.Module, bias: torch.Tensor) -> None:
    with torch.no_grad():
        bn.running_mean.zero_()
        # Choose var so that float32(var + eps) == 1 exactly.
        var = torch.tensor(1.0 - bn.eps, dtype=bn.running_var.dtype)
        one = torch.tensor(1.0, dtype=var.dtype)
        while var + bn.eps < one:
            var = torch.nextafter(var, one)
        while var + bn.eps > one:
            var = torch.nextafter(var, torch.tensor(0.0, dtype=var.dtype))
        bn.running_var.fill_(float(var))
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
