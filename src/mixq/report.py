"""The placement report: per layer, what was requested, what the backend runs it as, its kernels, and
(when profiled) the time of those kernels beside a float engine's.

Every time in a row belongs to that row's kernels. Time measured outside them (Q/DQ nodes, layout
changes, flatten, softmax, and anything profiled under a layer that has no kernel of its own) is glue,
so the rows plus glue add up to the profiled total. A layer timed together with its group leader (a ReLU
fused into its conv) shows ``in <leader>``; a layer with no kernel of its own shows ``fused``; a value
that was not measured shows ``-``, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import LayerPlacement, LayerTime

__all__ = ["PlacementReport", "fusion_groups", "group_times"]

GLUE = "(glue)"


def _us(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.1f} us"


@dataclass
class PlacementReport:
    """Per layer: requested precision, what it runs as, the kernels, unfused Q/DQ nodes, and (when
    profiled) the time of its kernels, beside a float engine's with a float comparison. ``times`` and
    ``float_times`` map layer names (and ``(glue)``) to microseconds, as ``Engine.profile`` gives them;
    ``groups`` maps a leader to the layers timed with it; ``glue_qdq`` counts Q/DQ nodes outside any
    layer (None: not counted)."""

    backend: str
    rows: list[LayerPlacement]
    times: dict[str, float] = field(default_factory=dict)
    float_times: dict[str, float] = field(default_factory=dict)
    batch: int | None = None
    glue_qdq: int | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)  # timed together: leader -> members
    selection: object | None = None  # mixq.auto.Selection: what backend="auto" tried and kept

    @property
    def mismatches(self) -> list[LayerPlacement]:
        return [r for r in self.rows if r.mismatch]

    def _leader(self, layer: str) -> str | None:
        return next((k for k, v in self.groups.items() if layer in v and k != layer), None)

    def _shows_time(self, r: LayerPlacement, times: dict[str, float], own: bool) -> bool:
        """Whether row ``r`` shows its value of ``times``: not for a group member (its leader does), and in
        this engine's column (``own``) not for a layer without kernels of its own."""
        if r.layer not in times or self._leader(r.layer) is not None:
            return False
        return not own or bool(r.kernels) or r.layer in self.groups

    def row_times(self, times: dict[str, float], own: bool = True) -> dict[str, float]:
        """The times the rows show (``own``: this engine's column; else the float column)."""
        return {r.layer: times[r.layer] for r in self.rows if self._shows_time(r, times, own)}

    def total(self, times: dict[str, float]) -> float | None:
        return sum(times.values()) if times else None

    def glue(self, times: dict[str, float], own: bool = True) -> float | None:
        """Everything measured outside the rows' shown times: the total minus the rows, so they add up."""
        return sum(times.values()) - sum(self.row_times(times, own).values()) if times else None

    @property
    def slower_than_float(self) -> list[str]:
        mine, other = self.row_times(self.times), self.row_times(self.float_times, own=False)
        return [
            r.layer
            for r in self.rows
            if r.runs_as == "int8" and r.layer in mine and r.layer in other and mine[r.layer] > 1.05 * other[r.layer]
        ]

    def _cell(self, r: LayerPlacement, times: dict[str, float], own: bool) -> str:
        if not times:
            return "-"  # not measured
        leader = self._leader(r.layer)
        if leader is not None:
            return f"in {leader}"
        if self._shows_time(r, times, own):
            return f"{times[r.layer]:.1f}"
        if own and r.kernels:
            return "-"  # kernels of its own that the profile did not time
        return "fused"  # no kernel of its own in this engine

    def __str__(self) -> str:
        head = "| layer | op | requested | runs as | kernels | unfused Q/DQ |"
        sep = "|---|---|---|---|---|---|"
        timed = bool(self.times or self.float_times)
        if timed:
            head += " time us | float us |"
            sep += "---|---|"
        title = f"placement on {self.backend}" + (f" (times: batch {self.batch})" if timed and self.batch else "")
        lines = ([str(self.selection)] if self.selection is not None else []) + [title, head, sep]
        for r in self.rows:
            kernels = "+".join(r.kernels) or "-"
            line = f"| {r.layer} | {r.op_type} | {r.requested} | {r.runs_as} | {kernels} | {r.unfused_qdq} |"
            if timed:
                line += f" {self._cell(r, self.times, True)} | {self._cell(r, self.float_times, False)} |"
            lines.append(line)
        in_layers = sum(r.unfused_qdq for r in self.rows)
        if in_layers or self.glue_qdq:
            where = f"{in_layers} in the layers above" + (
                f", {self.glue_qdq} outside any layer" if self.glue_qdq is not None else ""
            )
            lines.append(f"unfused Q/DQ nodes: {where}" + ("; their time is under glue" if timed else ""))
        if timed:
            lines.append(
                "time us: the row's kernels only; glue is the time outside them (Q/DQ, layout, flatten, softmax)"
            )
            lines.append(f"glue: {_us(self.glue(self.times))}, float {_us(self.glue(self.float_times, own=False))}")
            lines.append(
                f"total kernel time: {_us(self.total(self.times))}, float engine {_us(self.total(self.float_times))}"
            )
        for r in self.mismatches:
            lines.append(f"WARNING: {r.layer} asked for {r.requested} but runs as {r.runs_as}: {r.note}")
        mine, other = self.row_times(self.times), self.row_times(self.float_times, own=False)
        requested = {r.layer: r.requested for r in self.rows}
        for layer in self.slower_than_float:
            # Only a layer the config asked to quantize can be left out of it; one that runs int8 without being in
            # the config got there from the backend (e.g. a pool between quantized layers takes their int8 tensors).
            advice = (
                "consider leaving it out of the config"
                if requested[layer] == "int8"
                else f"it is not in the config: {self.backend} runs it on the int8 tensors of its neighbours"
            )
            lines.append(
                f"WARNING: {layer} is slower in int8 ({mine[layer]:.1f} us) than in float "
                f"({other[layer]:.1f} us) on {self.backend}; {advice}"
            )
        for r in self.rows:
            if r.note and r.requested in ("fp16", "fp8"):
                lines.append(f"note: {r.layer}: {r.note}")
        return "\n".join(lines)


def _execution_order(model: nn.Module, layers: dict, example: torch.Tensor) -> list[str]:
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in model.named_modules()
        if n in layers
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order + [n for n in layers if n not in order]


def fusion_groups(model: nn.Module, layers: dict, example: torch.Tensor) -> dict[str, list[str]]:
    """Each weighted layer with the ReLU/ReLU6 that directly follows it in execution order: backends fuse
    the pair (float: FusedConv/FusedGemm; int8: the ReLU becomes the quantized range), so they are timed
    as one."""
    names = _execution_order(model, layers, example)
    groups: dict[str, list[str]] = {}
    leader = None
    for n in names:
        op = layers[n]["op_type"]
        if op in ("ReLU", "ReLU6") and leader is not None:
            groups[leader].append(n)
            leader = None
            continue
        groups[n] = [n]
        leader = n if op in ("Conv1d", "Conv2d", "Linear") else None
    return groups


def group_times(rows: list[LayerTime], groups: dict[str, list[str]]) -> dict[str, float]:
    """Per-layer times with each group's members added to its leader; every other key (``(glue)``, a layer
    in no group) is kept, so the values add up to the profiled total."""
    leader_of = {m: leader for leader, members in groups.items() for m in members}
    out: dict[str, float] = {}
    for r in rows:
        key = leader_of.get(r.layer, r.layer)
        out[key] = out.get(key, 0.0) + r.microseconds
    return out
