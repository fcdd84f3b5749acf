"""Assignment solvers, pure functions over a cost table: per unit a list of options, each with a predicted
latency and a predicted metric drop (both additive over units).

* :func:`pareto_front` is exact: a dynamic program over the units that keeps every non-dominated partial
  assignment (Nemhauser-Ullmann). A partial assignment that is slower and drops more than another can
  never complete to a better one, because both objectives are sums, so pruning it loses nothing. The
  front gives the optimum for any drop budget or latency target at once. Its size stays small in
  practice; past ``max_states`` it gives up (returns None) and the caller uses the greedy solver.
* :func:`greedy` is for larger problems: start from the fastest option per unit and, while the budget is
  missed, make the change that costs the least latency per unit of drop saved; then take back any
  change the slack allows. Not optimal in general; the search verifies its answer end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Option",
    "Plan",
    "pareto_front",
    "greedy",
    "greedy_for_latency",
    "best_for_drop",
    "best_for_latency",
    "plan_of",
]

EPS = 1e-9


@dataclass(frozen=True)
class Option:
    choice: str
    latency: float
    drop: float


@dataclass(frozen=True)
class Plan:
    """One assignment: ``picks[i]`` is the index of unit i's option."""

    picks: tuple[int, ...]
    latency: float
    drop: float


def plan_of(problem: Sequence[Sequence[Option]], picks: Sequence[int]) -> Plan:
    opts = [problem[i][p] for i, p in enumerate(picks)]
    return Plan(tuple(picks), sum(o.latency for o in opts), sum(o.drop for o in opts))


def _nondominated(plans: list[Plan]) -> list[Plan]:
    """The plans no other plan beats on both latency and drop, by latency ascending (ties: first kept)."""
    plans.sort(key=lambda p: (p.latency, p.drop))
    out: list[Plan] = []
    for p in plans:
        if not out or p.drop < out[-1].drop - EPS:
            out.append(p)
    return out


def pareto_front(
    problem: Sequence[Sequence[Option]], max_drop: float = float("inf"), max_states: int = 100_000
) -> list[Plan] | None:
    """Every non-dominated plan whose predicted drop is at most ``max_drop``, by latency ascending (so by
    drop descending). None when an intermediate front grows past ``max_states``."""
    front = [Plan((), 0.0, 0.0)]
    for options in problem:
        grown = [
            Plan((*p.picks, i), p.latency + o.latency, p.drop + o.drop)
            for p in front
            for i, o in enumerate(options)
            if p.drop + o.drop <= max_drop + EPS
        ]
        front = _nondominated(grown)
        if len(front) > max_states:
            return None
    return front


def best_for_drop(front: Sequence[Plan], max_drop: float) -> Plan | None:
    """The fastest plan of the front within ``max_drop``."""
    return min((p for p in front if p.drop <= max_drop + EPS), key=lambda p: p.latency, default=None)


def best_for_latency(front: Sequence[Plan], max_latency: float) -> Plan | None:
    """The plan of the front with the least drop among those at most ``max_latency``."""
    return min((p for p in front if p.latency <= max_latency + EPS), key=lambda p: (p.drop, p.latency), default=None)


def greedy(problem: Sequence[Sequence[Option]], max_drop: float) -> Plan:
    """The fastest plan greedy finds within ``max_drop`` (the most accurate plan if nothing fits)."""
    return _greedy(problem, "latency", "drop", max_drop)


def greedy_for_latency(problem: Sequence[Sequence[Option]], max_latency: float) -> Plan:
    """The most accurate plan greedy finds within ``max_latency`` (the fastest plan if nothing fits)."""
    return _greedy(problem, "drop", "latency", max_latency)


def _greedy(problem: Sequence[Sequence[Option]], objective: str, constraint: str, limit: float) -> Plan:
    """Minimize the sum of ``objective`` with the sum of ``constraint`` at most ``limit``: start from the
    best option per unit for the objective; while over the limit, make the change that costs the least
    objective per unit of constraint saved; then make any change the slack allows, largest gain first."""

    def val(u: int, i: int, key: str) -> float:
        return getattr(problem[u][i], key)

    picks = [
        min(range(len(opts)), key=lambda i, u=u: (val(u, i, objective), val(u, i, constraint)))
        for u, opts in enumerate(problem)
    ]

    def total(key: str) -> float:
        return sum(val(u, p, key) for u, p in enumerate(picks))

    while total(constraint) > limit + EPS:
        moves = [
            (
                (val(u, i, objective) - val(u, picks[u], objective))
                / (val(u, picks[u], constraint) - val(u, i, constraint)),
                u,
                i,
            )
            for u, opts in enumerate(problem)
            for i in range(len(opts))
            if val(u, i, constraint) < val(u, picks[u], constraint) - EPS
        ]
        if not moves:
            break
        _, u, i = min(moves)
        picks[u] = i
    while True:
        slack = limit - total(constraint)
        moves = [
            (val(u, i, objective) - val(u, picks[u], objective), u, i)
            for u, opts in enumerate(problem)
            for i in range(len(opts))
            if val(u, i, objective) < val(u, picks[u], objective) - EPS
            and val(u, i, constraint) - val(u, picks[u], constraint) <= slack + EPS
        ]
        if not moves:
            break
        _, u, i = min(moves)
        picks[u] = i
    return plan_of(problem, picks)
