"""The search procedure over a :class:`~.measure.Measurer`: latency tables, sensitivities, solve, verify.

1. Profile, on every backend, the engine with every unit at each choice: the per-unit kernel times (the
   placement report's profiler) are each (unit, choice)'s predicted cost; the rest of the float engine
   (pools, glue) is a constant. Q/DQ glue at float/quantized boundaries is not in the prediction (it
   depends on the neighbours): the whole-engine measurements of step 4 decide. The placement says
   whether the backend really runs a choice (fp16 requests that run fp32 are left out, with a note).
2. Only (unit, choice) options predicted faster than fp32 on some backend are candidates. Each gets a
   cheap proxy (output SQNR with only that unit quantized); the most promising (latency gain per unit of
   proxy noise) get their metric drop measured (PTQ, fake-quant model); the rest are predicted from the
   proxy by a least-squares fit of drop against noise power.
3. Per backend, solve for the fastest assignment within the budget (exact Pareto DP, or greedy past
   ``exact_limit`` states); the best few plans and the uniform engines are the finalists.
4. Build every finalist and the float engines, time them interleaved in one run, and verify each on the
   verification metric. A finalist faster than the fastest float engine but over the budget backs off one
   unit at a time (the one with the most drop per latency saved goes back to fp32), re-timed and
   re-verified, until a configuration passes or none is faster than float.
5. Confirm the winner against the float engines in a longer interleaved run. Never return a
   configuration slower than the fastest float engine: if it is not faster there, the float engine wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._errors import ConfigError
from .measure import Measurer
from .solve import Option, Plan, greedy, greedy_for_latency, pareto_front
from .space import CHOICES, FLOAT, offered_on

__all__ = ["Budget", "as_budget", "Sensitivity", "Evaluated", "Outcome", "run_search"]

DEFAULT_MAX_DROP = 0.5


@dataclass(frozen=True)
class Budget:
    """Either ``max_drop`` (the largest allowed drop of the metric, in its units: 0.5 = half a point of
    top-1 %) or ``latency_ms`` (a latency target: the most accurate configuration at most this slow).
    Neither given: ``max_drop=0.5``."""

    max_drop: float | None = None
    latency_ms: float | None = None

    def __post_init__(self):
        if self.max_drop is not None and self.latency_ms is not None:
            raise ConfigError("budget: give max_drop or latency_ms, not both")
        if self.max_drop is None and self.latency_ms is None:
            object.__setattr__(self, "max_drop", DEFAULT_MAX_DROP)
        for key, low in (("max_drop", 0.0), ("latency_ms", None)):
            v = getattr(self, key)
            if v is None:
                continue
            bad = isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            if bad or (v < low if low is not None else v <= 0):
                words = "a number >= 0" if low is not None else "a positive number"
                raise ConfigError(f"budget: {key} must be {words}, got {v!r}")

    def __str__(self) -> str:
        return f"max drop {self.max_drop:g}" if self.max_drop is not None else f"latency <= {self.latency_ms:g} ms"


def as_budget(value) -> Budget:
    """A :class:`Budget` from a Budget or a number (the largest allowed metric drop)."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Budget(max_drop=float(value))
    raise ConfigError(f"budget must be a number (the largest metric drop) or mixq.search.Budget, got {value!r}")


@dataclass(frozen=True)
class Sensitivity:
    """One candidate (unit, choice): its proxy, its drop (measured, else predicted from the proxy) and its
    predicted latency gain per backend (microseconds; positive = faster than fp32)."""

    unit: str
    choice: str
    sqnr_db: float
    measured_drop: float | None
    drop: float
    gains_us: dict


@dataclass(frozen=True)
class Evaluated:
    """One configuration whose whole engine was built, timed and verified. ``latency_ms`` and ``float_ms``
    (the fastest float engine) come from the same interleaved run."""

    label: str
    backend: str
    assignment: tuple[str, ...]
    latency_ms: float
    float_ms: float
    metric: float | None
    drop: float | None
    predicted_ms: float | None = None
    predicted_drop: float | None = None

    @property
    def ratio(self) -> float:
        return self.latency_ms / self.float_ms

    @property
    def quantized(self) -> bool:
        return any(c != FLOAT for c in self.assignment)


@dataclass(frozen=True)
class Outcome:
    winner: Evaluated
    rows: tuple[Evaluated, ...]
    sensitivity: tuple[Sensitivity, ...]
    reference: dict
    budget: Budget
    met: bool
    reason: str
    notes: tuple[str, ...]
    solver: str


class _Search:
    def __init__(self, measurer: Measurer, budget: Budget, choices: Sequence[str], log: Callable[[str], None]):
        self.m, self.budget, self.log = measurer, budget, log
        self.units = [u.name for u in measurer.units]
        self.backends = measurer.backends()
        self.choices = [c for c in choices if c != FLOAT]
        self.notes: list[str] = []
        self.rows: list[Evaluated] = []
        self.cost: dict[tuple[str, str], list[float]] = {}
        self.avail: dict[tuple[str, str], list[bool]] = {}
        self.gains: dict[tuple[int, str], dict[str, float]] = {}
        self.drops: dict[tuple[int, str], float] = {}
        self.rest: dict[str, float] = {}  # backend -> us of the float engine outside the units' kernels
        self.scale: dict[str, float] = {}  # backend -> measured float ms per predicted ms
        self.solvers: set[str] = set()

    @property
    def float_assignment(self) -> tuple[str, ...]:
        return tuple(FLOAT for _ in self.units)

    # --- 1. latency tables -------------------------------------------------------------------------------

    def profile(self) -> None:
        for b in self.backends:
            for c in (FLOAT, *self.choices):
                if not offered_on(c, b):
                    self.cost[b, c] = list(self.cost[b, FLOAT])
                    self.avail[b, c] = [False for _ in self.units]
                    self.notes.append(f"{c} on {b}: not offered (no {c} kernels on {b}); left out on {b}")
                    continue
                self.log(f"profiling {b} with every layer at {c}")
                prof = self.m.profile(b, c)
                self.cost[b, c] = [prof["times"][u] for u in self.units]
                if c == FLOAT:
                    self.rest[b] = prof["total"] - sum(self.cost[b, c])
                runs_as = prof["runs_as"]
                self.avail[b, c] = [c == FLOAT or runs_as[u] == CHOICES[c].precision for u in self.units]
                if c != FLOAT and not any(self.avail[b, c]):
                    u = self.units[0]
                    note = prof["notes"].get(u) or "no note"
                    self.notes.append(f"{c} on {b}: asked {c}, runs as {runs_as[u]} ({u}: {note}); left out on {b}")
        for c in self.choices:
            if not any(any(self.avail[b, c]) for b in self.backends):
                self.notes.append(f"{c}: no backend here runs it, so the search leaves it out")
        for i, _ in enumerate(self.units):
            for c in self.choices:
                g = {b: self.cost[b, FLOAT][i] - self.cost[b, c][i] for b in self.backends if self.avail[b, c][i]}
                if any(v > 0 for v in g.values()):
                    self.gains[i, c] = g
        total = len(self.units) * len(self.choices)
        self.log(f"{len(self.gains)} of {total} quantized layer options are predicted faster than fp32 on some backend")

    # --- 2. sensitivities --------------------------------------------------------------------------------

    def sensitivities(self, ref: dict, max_measured: int | None) -> tuple[Sensitivity, ...]:
        proxies = {}
        for i, c in self.gains:
            self.log(f"proxy: output SQNR with only {self.units[i]} at {c}")
            proxies[i, c] = self.m.proxy(self.units[i], c)

        def noise(k) -> float:
            return 10 ** (-proxies[k] / 10)

        promise = sorted(self.gains, key=lambda k: (-max(self.gains[k].values()) / max(noise(k), 1e-30), k))
        chosen = promise if max_measured is None else promise[:max_measured]
        measured = {}
        for i, c in chosen:
            self.log(f"sensitivity: metric with only {self.units[i]} at {c}")
            assignment = tuple(c if j == i else FLOAT for j in range(len(self.units)))
            measured[i, c] = ref["eval"] - self.m.metric(assignment)
        points = [(noise(k), max(0.0, d)) for k, d in measured.items() if math.isfinite(noise(k))]
        denom = sum(x * x for x, _ in points)
        slope = sum(x * d for x, d in points) / denom if denom > 0 else None
        if len(chosen) < len(promise):
            fit = f"drop = {slope:.4g} x noise power" if slope is not None else "no fit (nothing measured)"
            self.notes.append(f"sensitivity measured for {len(chosen)} of {len(promise)} options; the rest: {fit}")
        out = []
        for k in self.gains:
            if k in measured:
                self.drops[k] = max(0.0, measured[k])
            else:
                self.drops[k] = slope * noise(k) if slope is not None else math.inf
            i, c = k
            out.append(Sensitivity(self.units[i], c, proxies[k], measured.get(k), self.drops[k], self.gains[k]))
        return tuple(out)

    # --- 3. solve ----------------------------------------------------------------------------------------

    def problem(self, b: str) -> list[list[Option]]:
        out = []
        for i, _ in enumerate(self.units):
            opts = [Option(FLOAT, self.cost[b, FLOAT][i], 0.0)]
            for c in self.choices:
                k = (i, c)
                if k in self.gains and self.gains[k].get(b, 0.0) > 0 and math.isfinite(self.drops[k]):
                    opts.append(Option(c, self.cost[b, c][i], self.drops[k]))
            out.append(opts)
        return out

    def plans(self, b: str, finalists: int, exact_limit: int) -> list[Plan]:
        problem = self.problem(b)
        limit = self.budget.max_drop if self.budget.max_drop is not None else math.inf
        front = pareto_front(problem, limit, exact_limit)
        if front is not None:
            self.solvers.add("exact (Pareto DP)")
            quantized = [p for p in front if any(p.picks)]
            if self.budget.max_drop is not None:
                return quantized[:finalists]
            target = self.target_us(b)
            within = sorted((p for p in quantized if p.latency <= target), key=lambda p: (p.drop, p.latency))
            return within[:finalists] + ([quantized[0]] if quantized and quantized[0] not in within else [])
        self.solvers.add("greedy")
        if self.budget.max_drop is not None:
            plan = greedy(problem, self.budget.max_drop)
        else:
            plan = greedy_for_latency(problem, self.target_us(b))
        return [plan] if any(plan.picks) else []

    def candidates(self, finalists: int, exact_limit: int) -> list[tuple[str, str, tuple, float | None, float | None]]:
        out, seen = [], set()
        for b in self.backends:
            problem = self.problem(b)
            for n, plan in enumerate(self.plans(b, finalists, exact_limit)):
                a = tuple(problem[i][p].choice for i, p in enumerate(plan.picks))
                out.append((f"search {b} #{n + 1}", b, a, self.predicted_ms(b, a), plan.drop))
                seen.add((b, a))
            for c in self.choices:
                a = tuple(c for _ in self.units)
                if any(self.avail[b, c]) and (b, a) not in seen:
                    out.append((f"all {c}", b, a, self.predicted_ms(b, a), self.predicted_drop(a)))
                    seen.add((b, a))
        return out

    def predicted_ms(self, b: str, a: Sequence[str]) -> float:
        """Whole-engine ms predicted from the profiles, on the scale of the measured float engine."""
        return (sum(self.cost[b, c][i] for i, c in enumerate(a)) + self.rest[b]) / 1e3 * self.scale[b]

    def target_us(self, b: str) -> float:
        """The latency target in the units of the per-unit costs of backend ``b``."""
        return self.budget.latency_ms / self.scale[b] * 1e3 - self.rest[b]

    def predicted_drop(self, a: Sequence[str]) -> float | None:
        ds = [self.drops.get((i, c)) for i, c in enumerate(a) if c != FLOAT]
        return None if any(d is None for d in ds) else sum(ds)

    # --- 4./5. measure, verify, back off -----------------------------------------------------------------

    def measure(self, group: list[tuple], ref: dict, scale: int = 1) -> tuple[list[Evaluated], dict[str, float]]:
        """Time ``group`` ([(label, backend, assignment, predicted ms, predicted drop)]) interleaved with the
        float engines of every backend, verify each, record the rows. An empty group records the float
        engines themselves. Returns (rows, {backend: float ms in this run})."""
        floats = [("fp32", b, self.float_assignment, None, 0.0) for b in self.backends]
        timed = floats + list(group)
        ms = self.m.latency([[g[1], list(g[2])] for g in timed], scale)
        float_ms = dict(zip(self.backends, ms[: len(floats)], strict=True))
        best = min(float_ms.values())
        rows = []
        for (label, b, a, pms, pdrop), t in list(zip(timed, ms, strict=True))[0 if not group else len(floats) :]:
            self.log(f"verifying {label} on {b}: {t:.3f} ms ({t / best:.2f}x the fastest float engine)")
            metric = self.m.engine_metric(b, a)
            rows.append(Evaluated(label, b, tuple(a), t, best, metric, ref["verify"] - metric, pms, pdrop))
        self.rows.extend(rows)
        return rows, float_ms

    def back_off(self, row: Evaluated) -> tuple | None:
        """``row`` with one more unit at fp32: the one with the most predicted drop per latency saved."""
        worst, key = None, None
        for i, c in enumerate(row.assignment):
            if c == FLOAT:
                continue
            gain = self.gains.get((i, c), {}).get(row.backend, 0.0)
            score = math.inf if gain <= 0 else self.drops.get((i, c), math.inf) / gain
            if key is None or score > key:
                worst, key = i, score
        if worst is None:
            return None
        a = tuple(FLOAT if i == worst else c for i, c in enumerate(row.assignment))
        if not any(c != FLOAT for c in a):
            return None
        label = f"{row.label} -{self.units[worst]}"
        return (label, row.backend, a, self.predicted_ms(row.backend, a), self.predicted_drop(a))

    def passes(self, r: Evaluated) -> bool:
        if self.budget.max_drop is not None:
            return r.drop is not None and r.drop <= self.budget.max_drop + 1e-9
        return r.latency_ms <= self.budget.latency_ms

    def pick(self) -> Evaluated | None:
        """The best verified configuration: with a drop budget the fastest quantized one within it that is
        faster than float (None: none); with a latency target the most accurate within it, float engines
        included, quantized ones only when faster than float."""
        if self.budget.max_drop is not None:
            ok = [r for r in self.rows if r.quantized and r.ratio < 1 and self.passes(r)]
            return min(ok, key=lambda r: r.ratio, default=None)
        ok = [r for r in self.rows if self.passes(r) and (r.ratio < 1 or not r.quantized)]
        return min(ok, key=lambda r: (r.drop, r.ratio), default=None)

    def verify_loop(self, ref: dict) -> None:
        if self.budget.max_drop is None:
            return  # latency target: the finalists are the front's points near the target; nothing to back off
        expanded: set[tuple] = set()
        while True:
            best = self.pick()
            open_ = [
                r
                for r in self.rows
                if r.quantized and r.ratio < 1 and not self.passes(r) and (r.backend, r.assignment) not in expanded
            ]
            nxt = min(open_, key=lambda r: r.ratio, default=None)
            if nxt is None or (best is not None and best.ratio <= nxt.ratio):
                return
            expanded.add((nxt.backend, nxt.assignment))
            child = self.back_off(nxt)
            known = {(r.backend, r.assignment) for r in self.rows}
            if child is None or (child[1], child[2]) in known:
                continue
            self.log(f"{nxt.label} on {nxt.backend} missed the budget (drop {nxt.drop:.3f}): backing off to {child[0]}")
            self.measure([child], ref)


def run_search(
    measurer: Measurer,
    budget: Budget,
    choices: Sequence[str],
    finalists: int = 3,
    max_measured: int | None = None,
    exact_limit: int = 100_000,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """The procedure in the module docstring; ``choices`` are expressible choice names (fp32 included)."""
    s = _Search(measurer, budget, choices, log or (lambda _: None))
    ref = measurer.reference()
    s.log(f"reference: float model {ref['eval']:.4g} (search metric), float engine {ref['verify']:.4g} (verified)")
    s.profile()
    sensitivity = s.sensitivities(ref, max_measured)
    float_rows, float_ms = s.measure([], ref)
    for b in s.backends:
        s.scale[b] = float_ms[b] / ((sum(s.cost[b, FLOAT]) + s.rest[b]) / 1e3)
    s.measure(s.candidates(finalists, exact_limit), ref)
    s.verify_loop(ref)
    best, met = s.pick(), True
    if best is None and budget.latency_ms is not None:  # nothing meets the target: the fastest, flagged
        met = False
        best = min((r for r in s.rows if r.quantized and r.ratio < 1), key=lambda r: r.ratio, default=None)
    winner, reason = None, ""
    if best is not None and best.quantized:
        s.log(f"confirming {best.label} on {best.backend} against the float engines")
        rows, float_ms = s.measure(
            [(f"{best.label} (confirm)", best.backend, best.assignment, best.predicted_ms, best.predicted_drop)],
            ref,
            scale=2,
        )
        confirmed = rows[0]
        if confirmed.ratio < 1:
            winner = confirmed
            reason = f"{best.label} on {best.backend}: {winner.ratio:.2f}x the fastest float engine's latency"
            if budget.max_drop is not None:
                reason += f", verified drop {winner.drop:.3f} <= {budget.max_drop:g}"
            elif met:
                reason += f", {winner.latency_ms:.3f} ms <= {budget.latency_ms:g} ms, the most accurate within it"
            else:
                reason += f"; nothing met the latency target of {budget.latency_ms:g} ms, this is the fastest"
        else:
            reason = (
                f"{best.label} on {best.backend} was not faster than the fastest float engine in the confirmation "
                f"run ({confirmed.latency_ms:.3f} vs {confirmed.float_ms:.3f} ms), so the float engine is returned"
            )
    elif best is not None:
        reason = f"the float engine on {best.backend} is the most accurate configuration within {budget}"
    elif any(r.quantized and r.ratio < 1 for r in s.rows):
        reason = "no configuration faster than the fastest float engine met the budget, so that engine is returned"
    else:
        reason = "no quantized configuration was faster than the fastest float engine, so that engine is returned"
    if winner is None:
        b = min(float_ms, key=float_ms.get)
        winner = next(r for r in float_rows if r.backend == b)
        if budget.latency_ms is not None and float_ms[b] > budget.latency_ms:
            met = False
            reason += f"; no configuration met the latency target of {budget.latency_ms:g} ms"
    solver = " + ".join(sorted(s.solvers)) or "none (no candidate option)"
    return Outcome(winner, tuple(s.rows), sensitivity, ref, budget, met, reason, tuple(s.notes), solver)
