"""What a search returns: the chosen config_list and backend, the built engine and its placement report,
and the tables (Pareto: every configuration evaluated; sensitivity: every candidate layer option), the
plot, and ``save`` to write them all to a folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write
from .run import Evaluated, Outcome
from .space import Unit, describe

__all__ = ["SearchResult", "pareto_rows"]


def pareto_rows(rows: tuple[Evaluated, ...]) -> set[int]:
    """Indices of the rows no other row beats on both latency (ratio to the fastest float engine of the
    same run) and verified drop. A configuration measured twice (a confirmation run) counts by its last row."""
    last = {(r.backend, r.assignment): i for i, r in enumerate(rows)}
    live = [i for i in last.values() if rows[i].drop is not None]
    out = set()
    for i in live:
        r = rows[i]
        beaten = any(
            rows[j].ratio <= r.ratio and rows[j].drop <= r.drop and (rows[j].ratio < r.ratio or rows[j].drop < r.drop)
            for j in live
        )
        if not beaten:
            out.add(i)
    return out


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


@dataclass
class SearchResult:
    """``config_list`` (for ``mixq.prepare_`` and the NNI quantizers; ``[]`` means float), ``backend``,
    ``assignment`` (``{layer: choice}``), ``model`` (the winner PTQ-calibrated, or fine-tuned; the float
    model when float wins), ``engine`` and ``speedup`` (the built winner), ``report`` (its placement report,
    with per-layer times beside the float engine's when quantized) and ``outcome`` (every row measured)."""

    config_list: list
    backend: str
    assignment: dict
    units: tuple[Unit, ...]
    outcome: Outcome
    model: object
    engine: object
    speedup: object
    report: object
    batch: int
    finetuned: Evaluated | None = None  # the QAT fine-tuned winner, when asked for
    finetune_kept: bool = False  # whether it replaced the PTQ winner (it verified at least as well)
    machine: dict = field(default_factory=dict)

    @property
    def winner(self) -> Evaluated:
        return self.finetuned if self.finetune_kept else self.outcome.winner

    @property
    def latency_ms(self) -> float:
        return self.winner.latency_ms

    @property
    def rows(self) -> tuple[Evaluated, ...]:
        return self.outcome.rows + ((self.finetuned,) if self.finetuned is not None else ())

    def summary(self) -> str:
        w, o = self.winner, self.outcome
        lines = [
            f"chosen: {describe(self.units, self.assignment)} on {self.backend}",
            f"  latency {w.latency_ms:.3f} ms at batch {self.batch} ({w.ratio:.2f}x the fastest float engine, "
            f"same run); verified metric {_num(w.metric, '.4g')} (float engine {o.reference['verify']:.4g})",
            f"  budget: {o.budget}{'' if o.met else ' (NOT met)'}; {o.reason}",
            f"  solver: {o.solver}; {len(self.rows)} engines built and verified",
        ]
        lines += [f"  note: {n}" for n in o.notes]
        return "\n".join(lines)

    def pareto_table(self) -> str:
        rows = self.rows
        front = pareto_rows(rows)
        lines = [
            "| configuration | backend | layers | latency ms | vs fastest float (same run) | predicted ms | "
            "verified metric | drop | predicted drop | Pareto |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(rows):
            mark = " **chosen**" if r is self.winner else ""
            layers = describe(self.units, dict(zip(self._names, r.assignment, strict=True)))
            lines.append(
                f"| {r.label}{mark} | {r.backend} | {layers} | "
                f"{r.latency_ms:.3f} | {r.ratio:.2f} | {_num(r.predicted_ms, '.3f')} | {_num(r.metric, '.3f')} | "
                f"{_num(r.drop, '.3f')} | {_num(r.predicted_drop, '.3f')} | {'yes' if i in front else ''} |"
            )
        return "\n".join(lines)

    def sensitivity_table(self) -> str:
        backends = sorted({b for s in self.outcome.sensitivity for b in s.gains_us})
        head = "| layer | choice | output SQNR dB | measured drop | drop used | " + " | ".join(
            f"gain us ({b})" for b in backends
        )
        lines = [head + " |", "|---|---|---|---|---|" + "---|" * len(backends)]
        for s in self.outcome.sensitivity:
            gains = " | ".join(_num(s.gains_us.get(b), ".1f") for b in backends)
            lines.append(
                f"| {s.unit} | {s.choice} | {s.sqnr_db:.1f} | {_num(s.measured_drop, '.3f')} | {s.drop:.3f} | {gains} |"
            )
        if not self.outcome.sensitivity:
            lines.append("| (no layer option predicted faster than fp32 on any backend) |")
        return "\n".join(lines)

    @property
    def _names(self) -> list[str]:
        return [u.name for u in self.units]

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Verified metric against latency (as a multiple of the fastest float engine in the same run) for
        every configuration evaluated; the Pareto front joined, the chosen one starred."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        last = {(r.backend, r.assignment): r for r in self.rows}  # a confirmed configuration: its last run
        rows = [r for r in last.values() if r.metric is not None]
        front = sorted((self.rows[i] for i in pareto_rows(self.rows)), key=lambda r: r.ratio)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for backend, marker in zip(sorted({r.backend for r in rows}), "osD^v<>", strict=False):
            mine = [r for r in rows if r.backend == backend]
            ax.scatter([r.ratio for r in mine], [r.metric for r in mine], marker=marker, label=backend, alpha=0.75)
        ax.plot([r.ratio for r in front], [r.metric for r in front], "k--", lw=1, label="Pareto front")
        w = self.winner
        ax.scatter([w.ratio], [w.metric], marker="*", s=260, c="red", zorder=5, label="chosen")
        budget = self.outcome.budget
        if budget.max_drop is not None:
            ax.axhline(self.outcome.reference["verify"] - budget.max_drop, color="grey", lw=1, ls=":")
            ax.text(ax.get_xlim()[0], self.outcome.reference["verify"] - budget.max_drop, " budget", va="bottom")
        ax.axvline(1.0, color="grey", lw=1, ls=":")
        ax.set_xlabel("latency / fastest float engine (same interleaved run)")
        ax.set_ylabel("verified metric (engine, held-out data)")
        ax.set_title(title or f"mixq search, batch {self.batch}: every configuration evaluated")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        return path

    def to_dict(self) -> dict:
        def row(r: Evaluated) -> dict:
            return {
                "label": r.label,
                "backend": r.backend,
                "assignment": dict(zip(self._names, r.assignment, strict=True)),
                "latency_ms": r.latency_ms,
                "fastest_float_ms": r.float_ms,
                "metric": r.metric,
                "drop": r.drop,
                "predicted_ms": r.predicted_ms,
                "predicted_drop": r.predicted_drop,
            }

        o = self.outcome
        return {
            "config_list": self.config_list,
            "backend": self.backend,
            "assignment": self.assignment,
            "batch": self.batch,
            "budget": {"max_drop": o.budget.max_drop, "latency_ms": o.budget.latency_ms, "met": o.met},
            "reason": o.reason,
            "solver": o.solver,
            "notes": list(o.notes),
            "reference": o.reference,
            "winner": row(self.winner),
            "rows": [row(r) for r in self.rows],
            "sensitivity": [
                {
                    "unit": s.unit,
                    "choice": s.choice,
                    "sqnr_db": s.sqnr_db,
                    "measured_drop": s.measured_drop,
                    "drop": s.drop,
                    "gains_us": s.gains_us,
                }
                for s in o.sensitivity
            ],
            "machine": self.machine,
        }

    def save(self, out: str | os.PathLike) -> list[Path]:
        """Write ``config.yaml`` (the config_list), ``search.md`` (summary and tables), ``pareto.png``,
        ``report.txt`` (the winner's placement report), ``search.json`` and ``engine.mixq`` to ``out``."""
        import yaml

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        with atomic_write(out / "config.yaml", "w") as f:
            f.write(f"# mixq search: {describe(self.units, self.assignment)} on {self.backend} (batch {self.batch})\n")
            f.write("# [] = every layer float\n" if not self.config_list else "")
            yaml.safe_dump(self.config_list, f, sort_keys=False)
        written.append(out / "config.yaml")
        text = "\n\n".join(
            [
                self.summary(),
                "## every configuration evaluated\n\n" + self.pareto_table(),
                "## layer options (sensitivity and predicted latency gain)\n\n" + self.sensitivity_table(),
            ]
        )
        with atomic_write(out / "search.md", "w") as f:
            f.write(text + "\n")
        written.append(out / "search.md")
        written.append(self.plot(out / "pareto.png"))
        with atomic_write(out / "report.txt", "w") as f:
            f.write(f"{self.report}\n")
        written.append(out / "report.txt")
        with atomic_write(out / "search.json", "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        written.append(out / "search.json")
        written.append(self.engine.save(out / "engine.mixq"))
        return written
