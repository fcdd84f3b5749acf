"""The placement report: per layer, what was requested, what the backend runs it as, its kernels, and
(when profiled) its time beside a float engine's."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import LayerPlacement, LayerTime

__all__ = ["PlacementReport", "fusion_groups", "group_times"]


@dataclass
class PlacementReport:
    """Per layer: requested precision, what it runs as, the kernels, unfused Q/DQ nodes, and (with a float
    comparison) its time in both forms, with a warning where int8 is slower."""

    backend: str
    rows: list[LayerPlacement]
    times: dict[str, float] = field(default_factory=dict)
    float_times: dict[str, float] = field(default_factory=dict)
    batch: int | None = None
    glue_qdq: int = 0
    groups: dict[str, list[str]] = field(default_factory=dict)  # timed together: leader -> members

    @property
    def mismatches(self) -> list[LayerPlacement]:
        return [r for r in self.rows if r.mismatch]

    @property
    def slower_than_float(self) -> list[str]:
        return [
            r.layer
            for r in self.rows
            if r.runs_as == "int8"
            and r.layer in self.times
            and r.layer in self.float_times
            and self.times[r.layer] > 1.05 * self.float_times[r.layer]
        ]

    def __str__(self) -> str:
        head = "| layer | op | requested | runs as | kernels | unfused Q/DQ |"
        sep = "|---|---|---|---|---|---|"
        timed = bool(self.times)
        if timed:
            head += " time us | float us |"
            sep += "---|---|"
        lines = [f"placement on {self.backend}" + (f" (times: batch {self.batch})" if timed else ""), head, sep]
        for r in self.rows:
            kernels = "+".join(r.kernels) or "-"
            line = f"| {r.layer} | {r.op_type} | {r.requested} | {r.runs_as} | {kernels} | {r.unfused_qdq} |"
            if timed:
                t, f = self.times.get(r.layer), self.float_times.get(r.layer)
                owner = next((k for k, v in self.groups.items() if r.layer in v and k != r.layer), None)
                if owner is not None:
                    line += f" in {owner} | in {owner} |"
                else:
                    line += f" {t:.1f} |" if t is not None else " - |"
                    line += f" {f:.1f} |" if f is not None else " - |"
            lines.append(line)
        if timed:
            g, fg = self.times.get("(glue)", 0.0), self.float_times.get("(glue)", 0.0)
            lines.append(f"glue outside the layers (Q/DQ, layout, flatten, softmax): {g:.1f} us, float {fg:.1f} us")
            total, ftotal = sum(self.times.values()), sum(self.float_times.values())
            lines.append(f"total kernel time: {total:.1f} us, float engine {ftotal:.1f} us")
        for r in self.mismatches:
            lines.append(f"WARNING: {r.layer} asked for {r.requested} but runs as {r.runs_as}: {r.note}")
        for layer in self.slower_than_float:
            lines.append(
                f"WARNING: {layer} is slower in int8 ({self.times[layer]:.1f} us) than in float "
                f"({self.float_times[layer]:.1f} us) on {self.backend}; consider leaving it out of the config"
            )
        for r in self.rows:
            if r.note and r.requested == "fp16":
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
    times = {r.layer: r.microseconds for r in rows}
    out = {leader: sum(times.get(m, 0.0) for m in members) for leader, members in groups.items()}
    if "(glue)" in times:
        out["(glue)"] = times["(glue)"]
    return out
