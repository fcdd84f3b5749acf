"""mixq.search: the solvers on small problems with known optimum, budgets, resumption from the on-disk cache,
the never-slower guarantee (fake measurers: fast and deterministic), one real end-to-end run on a tiny
model, and the CLI's checks."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch

import mixq
from mixq._errors import ConfigError
from mixq.search import Budget, Measurer, Unit, config_list_for, run_search
from mixq.search.cache import CachedMeasurer, DiskCache
from mixq.search.run import as_budget
from mixq.search.solve import (
    Option,
    best_for_drop,
    best_for_latency,
    greedy,
    greedy_for_latency,
    pareto_front,
    plan_of,
)
from mixq.search.space import CHOICES, check_choices, describe, find_units

# --- solvers --------------------------------------------------------------------------------------------


def random_problem(rng: random.Random, units: int, choices: int) -> list[list[Option]]:
    problem = []
    for _ in range(units):
        base = rng.uniform(50, 150)
        opts = [Option("fp32", base, 0.0)]
        for c in range(choices - 1):
            opts.append(Option(f"q{c}", base * rng.uniform(0.2, 1.3), round(rng.uniform(0.0, 0.6), 3)))
        problem.append(opts)
    return problem


def brute_force(problem):
    return [plan_of(problem, picks) for picks in itertools.product(*(range(len(o)) for o in problem))]


@pytest.mark.parametrize("seed", range(12))
def test_exact_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    problem = random_problem(rng, units=rng.randint(1, 7), choices=rng.randint(2, 3))
    everything = brute_force(problem)
    front = pareto_front(problem)
    for budget in (0.0, 0.1, 0.35, 0.8, 2.0):
        feasible = [p for p in everything if p.drop <= budget + 1e-9]
        best = best_for_drop(front, budget)
        assert best.latency == pytest.approx(min(p.latency for p in feasible))
        assert best.drop <= budget + 1e-9
        assert best == plan_of(problem, best.picks)  # the plan's sums are its picks' sums
        # the budget-pruned front gives the same optimum
        assert best_for_drop(pareto_front(problem, budget), budget).latency == pytest.approx(best.latency)
    for target in sorted(p.latency for p in everything)[:: max(1, len(everything) // 5)]:
        within = [p for p in everything if p.latency <= target + 1e-9]
        assert best_for_latency(front, target).drop == pytest.approx(min(p.drop for p in within))


def test_front_is_exactly_the_nondominated_set():
    problem = random_problem(random.Random(7), units=5, choices=3)
    everything = brute_force(problem)
    nondominated = {
        (round(p.latency, 9), round(p.drop, 9))
        for p in everything
        if not any(
            (o.latency <= p.latency and o.drop <= p.drop) and (o.latency < p.latency or o.drop < p.drop)
            for o in everything
        )
    }
    assert {(round(p.latency, 9), round(p.drop, 9)) for p in pareto_front(problem)} == nondominated


def test_known_optimum_where_greedy_is_not_optimal():
    # Within a drop of 1.0 the fastest plan quantizes b and c (saving 120). Greedy starts from everything
    # quantized (drop 1.6) and first gives back the change with the best ratio of latency per drop (b,
    # then c), ending with a alone (saving 100); the exact solver finds b + c.
    problem = [
        [Option("fp32", 100, 0.0), Option("int8", 0, 0.6)],
        [Option("fp32", 100, 0.0), Option("int8", 40, 0.5)],
        [Option("fp32", 100, 0.0), Option("int8", 40, 0.5)],
    ]
    exact = best_for_drop(pareto_front(problem), 1.0)
    assert exact.picks == (0, 1, 1) and exact.latency == pytest.approx(180)
    assert exact.latency == min(p.latency for p in brute_force(problem) if p.drop <= 1.0)
    g = greedy(problem, 1.0)
    assert g.picks == (1, 0, 0) and g.latency == pytest.approx(200) and g.drop <= 1.0


def test_greedy_stays_within_budget_and_uses_slack():
    for seed in range(20):
        problem = random_problem(random.Random(seed), units=8, choices=3)
        for budget in (0.0, 0.3, 1.0):
            plan = greedy(problem, budget)
            assert plan.drop <= budget + 1e-9
            # no single change can make it faster within the budget
            for u, opts in enumerate(problem):
                for o in opts:
                    cur = opts[plan.picks[u]]
                    if o.latency < cur.latency - 1e-9:
                        assert plan.drop - cur.drop + o.drop > budget + 1e-9
        target = plan_of(problem, [0] * 8).latency * 0.8
        plan = greedy_for_latency(problem, target)
        fastest = plan_of(problem, [min(range(len(o)), key=lambda i, o=o: o[i].latency) for o in problem])
        assert plan.latency <= target + 1e-9 or plan.latency == pytest.approx(fastest.latency)


def test_front_gives_up_past_max_states():
    problem = random_problem(random.Random(1), units=12, choices=3)
    assert pareto_front(problem, max_states=3) is None
    assert pareto_front(problem, max_states=100_000) is not None


# --- budgets and choices ---------------------------------------------------------------------------------


def test_budget_forms():
    assert Budget().max_drop == 0.5 and Budget().latency_ms is None
    assert as_budget(1).max_drop == 1.0
    assert Budget(latency_ms=2.5).max_drop is None
    for bad in (
        lambda: Budget(max_drop=0.5, latency_ms=1.0),
        lambda: Budget(max_drop=-0.1),
        lambda: Budget(latency_ms=0),
        lambda: Budget(max_drop=float("nan")),
        lambda: as_budget(True),
        lambda: as_budget("0.5"),
    ):
        with pytest.raises(ConfigError):
            bad()


def test_choices_checked_and_fp8_left_out_on_cpu_backends_with_a_reason():
    assert check_choices(("int8", "fp8", "fp16")) == (("fp32", "int8", "fp8", "fp16"), {})
    kept, left = check_choices(("int8", "fp8", "fp16"), ["onnxruntime", "openvino"])
    assert kept == ("fp32", "int8", "fp16")
    assert "no fp8 kernels on onnxruntime, openvino" in left["fp8"]
    assert "fp8 is searched on cuda and tensorrt" in left["fp8"]
    assert check_choices(("int8", "fp8"), ["onnxruntime", "cuda"]) == (("fp32", "int8", "fp8"), {})
    assert check_choices(("fp8",), ["tensorrt"]) == (("fp32", "fp8"), {})
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        check_choices(["int4"])
    with pytest.raises(ConfigError):
        check_choices("int8")


def test_config_list_for_is_accepted_by_the_quantizers():
    from mixq.nni import QAT_Quantizer
    from mixq.zoo.models import create_model

    model = create_model("lenet")
    units = find_units(model, torch.randn(1, 1, 28, 28))
    assert [u.name for u in units] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert units[0].members == ("relu1",)
    assignment = {"conv1": "fp32", "conv2": "int8", "fc1": "int8w7", "fc2": "int8", "fc3": "fp32"}
    config = config_list_for(units, assignment)
    specs = mixq.resolve_config(model, config)
    assert set(specs) == {"conv2", "relu2", "fc1", "relu3", "fc2", "relu4"}
    assert specs["fc1"].weight.dtype.bits == 7 and specs["conv2"].weight.dtype.bits == 8
    QAT_Quantizer(model, config, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 1, 28, 28))
    assert config_list_for(units, {}) == []
    assert describe(units, assignment) == "int8: conv2, fc2; int8w7: fc1; fp32: conv1, fc3"


# --- the procedure with a fake measurer ------------------------------------------------------------------

UNITS = [Unit("a", "Conv2d", ("a_relu",)), Unit("b", "Conv2d"), Unit("c", "Linear")]
NAMES = [u.name for u in UNITS]
DROPS = {("a", "int8"): 0.1, ("b", "int8"): 0.5, ("c", "int8"): 1.0}


class FakeMeasurer(Measurer):
    """Deterministic numbers: on backend ``x`` every unit takes 1000 us in fp32 and 400 us in int8 (whole
    engines take the sum, in ms); drops add up. ``engine_ms``/``engine_drop`` override the whole-engine
    truth; ``interrupt_after`` raises KeyboardInterrupt at that call."""

    def __init__(self, engine_ms=None, engine_drop=None, runs_as=None, interrupt_after=None, backends=("x",)):
        self.units = UNITS
        self._backends = list(backends)
        self.engine_ms = engine_ms or (lambda b, a, scale: self.predicted_ms(b, a))
        self.engine_drop = engine_drop or (lambda a: self.additive_drop(a))
        self.runs_as = runs_as or {}
        self.interrupt_after = interrupt_after
        self.calls = Counter()

    def unit_us(self, b, c):
        fast = {"x": 400.0, "y": 700.0}[b]
        return 1000.0 if c == "fp32" else fast if c == "int8" else 900.0

    def predicted_ms(self, b, a):
        return sum(self.unit_us(b, c) for c in a) / 1e3

    @staticmethod
    def additive_drop(a):
        return sum(DROPS.get((n, c), 0.0) for n, c in zip(NAMES, a, strict=True) if c != "fp32")

    def _count(self, what):
        self.calls[what] += 1
        if self.interrupt_after is not None and sum(self.calls.values()) >= self.interrupt_after:
            raise KeyboardInterrupt

    def fingerprint(self, depends):
        return f"fake-{depends}"

    def backends(self):
        return list(self._backends)

    def reference(self):
        return {"eval": 90.0, "verify": 91.0}

    def profile(self, backend, choice):
        self._count("profile")
        times = {n: self.unit_us(backend, choice) for n in NAMES}
        precision = self.runs_as.get((backend, choice), CHOICES[choice].precision)
        runs_as, notes = dict.fromkeys(NAMES, precision), dict.fromkeys(NAMES, "fake note")
        return {"times": times, "total": sum(times.values()), "runs_as": runs_as, "notes": notes}

    def latency(self, candidates, scale=1):
        self._count("latency")
        return [self.engine_ms(b, tuple(a), scale) for b, a in candidates]

    def proxy(self, unit, choice):
        self._count("proxy")
        return 40.0 - 10.0 * DROPS.get((unit, choice), 0.0)

    def metric(self, assignment):
        self._count("metric")
        return 90.0 - self.additive_drop(assignment)

    def engine_metric(self, backend, assignment):
        self._count("engine_metric")
        return 91.0 - self.engine_drop(tuple(assignment))


def search_fake(measurer, budget=0.6, choices=("fp32", "int8"), **kw):
    return run_search(measurer, as_budget(budget), choices, **kw)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [(0.05, None), (0.1, ("int8", "fp32", "fp32")), (0.6, ("int8", "int8", "fp32")), (5.0, ("int8",) * 3)],
)
def test_fastest_within_the_drop_budget(budget, expected):
    out = search_fake(FakeMeasurer(), budget)
    if expected is None:
        assert not out.winner.quantized and out.met
        assert "no configuration faster" in out.reason
    else:
        assert out.winner.assignment == expected
        assert out.winner.drop <= budget
        assert out.winner.ratio < 1
    assert out.solver == "exact (Pareto DP)"
    assert all(r.drop is not None for r in out.rows)  # every configuration evaluated was verified


def test_latency_target_gives_the_most_accurate_within_it():
    # float 3.0 ms; each int8 unit saves 0.6 ms: within 2.0 ms two units must be int8, the least lossy two
    out = search_fake(FakeMeasurer(), Budget(latency_ms=2.0))
    assert out.winner.assignment == ("int8", "int8", "fp32") and out.met
    out = search_fake(FakeMeasurer(), Budget(latency_ms=5.0))  # float meets it and loses nothing
    assert not out.winner.quantized and out.met
    out = search_fake(FakeMeasurer(), Budget(latency_ms=0.5))  # nothing meets it: the fastest, flagged
    assert out.winner.assignment == ("int8",) * 3 and not out.met


def test_greedy_when_the_exact_front_is_too_large():
    out = search_fake(FakeMeasurer(), 0.6, exact_limit=1)
    assert out.solver == "greedy"
    assert out.winner.assignment == ("int8", "int8", "fp32")


def test_back_off_when_the_verified_drop_misses_the_budget():
    # Quantizing two or more layers together costs 0.3 more than the sum: the predicted-best plan (a+b,
    # 0.6) verifies at 0.9 and must back off, one layer at a time, to a passing configuration.
    fake = FakeMeasurer(engine_drop=lambda a: FakeMeasurer.additive_drop(a) + (0.3 if a.count("int8") > 1 else 0))
    out = search_fake(fake, 0.65, finalists=1)
    assert out.winner.assignment == ("int8", "fp32", "fp32")
    assert out.winner.drop <= 0.65
    labels = [r.label for r in out.rows]
    assert any(" -b" in label for label in labels), labels  # b (most drop per latency saved) went back first
    failed = [r for r in out.rows if r.assignment == ("int8", "int8", "fp32")]
    assert failed and failed[0].drop == pytest.approx(0.9)


def test_never_slower_than_the_fastest_float_engine():
    # The profiles say int8 pays, but every whole quantized engine is 10% slower than float.
    slow = FakeMeasurer(engine_ms=lambda b, a, s: 3.0 * (1.1 if "int8" in a else 1.0))
    out = search_fake(slow, 5.0)
    assert not out.winner.quantized
    assert "no quantized configuration was faster" in out.reason
    # Faster in the search's runs, slower in the longer confirmation run: still float.
    flaky = FakeMeasurer(engine_ms=lambda b, a, s: 3.0 * ((0.9 if s == 1 else 1.05) if "int8" in a else 1.0))
    out = search_fake(flaky, 5.0)
    assert not out.winner.quantized
    assert "confirmation" in out.reason


def test_fastest_float_backend_is_the_floor_and_backends_compete():
    # backend y: fp32 1000 us, int8 700 us per unit; backend x is faster quantized: x wins
    out = search_fake(FakeMeasurer(backends=("y", "x")), 0.6)
    assert out.winner.backend == "x" and out.winner.assignment == ("int8", "int8", "fp32")
    float_rows = [r for r in out.rows if not r.quantized]
    assert {r.backend for r in float_rows} == {"x", "y"}


def test_a_choice_the_backend_does_not_run_is_left_out_and_said():
    fake = FakeMeasurer(runs_as={("x", "fp16"): "fp32"})
    out = search_fake(fake, 0.6, choices=("fp32", "fp16", "int8"))
    assert any("fp16 on x: asked fp16, runs as fp32" in n for n in out.notes)
    assert all("fp16" not in r.assignment for r in out.rows)
    assert out.winner.assignment == ("int8", "int8", "fp32")


def test_max_measured_predicts_the_rest_from_the_proxy():
    fake = FakeMeasurer()
    out = search_fake(fake, 0.6, max_measured=1)
    assert fake.calls["metric"] == 1
    measured = [s for s in out.sensitivity if s.measured_drop is not None]
    assert len(measured) == 1
    assert any("sensitivity measured for 1 of 3" in n for n in out.notes)


def test_resumes_from_the_cache_after_an_interruption(tmp_path):
    path = tmp_path / "cache.json"
    reference = search_fake(FakeMeasurer(), 0.6)
    fresh = FakeMeasurer()
    assert search_fake(CachedMeasurer(fresh, DiskCache(None)), 0.6) == reference
    unique = sum(fresh.calls.values())  # distinct measurements of a whole run
    for stop in (1, 5, unique - 1):
        path.unlink(missing_ok=True)
        with pytest.raises(KeyboardInterrupt):
            search_fake(CachedMeasurer(FakeMeasurer(interrupt_after=stop), DiskCache(path)), 0.6)
        resumed = FakeMeasurer()
        assert search_fake(CachedMeasurer(resumed, DiskCache(path)), 0.6) == reference
        assert sum(resumed.calls.values()) == unique - (stop - 1)  # only what was not measured before the stop
    again = FakeMeasurer()
    assert search_fake(CachedMeasurer(again, DiskCache(path)), 0.6) == reference
    assert sum(again.calls.values()) == 0
    assert len(json.loads(path.read_text())) == unique  # plain JSON on disk, one entry per measurement


def test_unreadable_cache_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="c.json cannot be read"):
        DiskCache(path)


# --- the real thing on a tiny model ----------------------------------------------------------------------


def test_search_end_to_end_on_a_tiny_model(tmp_path):
    from mixq.zoo.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_mlp").eval()
    data = torch.randn(256, 16)
    lines: list[str] = []
    kw = dict(backends="onnxruntime", batch=64, runs=5, profile_runs=3, cache_dir=tmp_path / "cache")
    result = mixq.search(model, data, budget=1.0, progress=lines.append, **kw)
    assert result.backend == "onnxruntime"
    w = result.winner
    assert not w.quantized or (w.ratio < 1 and w.drop <= 1.0)
    if result.config_list:
        mixq.resolve_config(create_model("tiny_mlp"), result.config_list)  # a valid config_list
    out = result.engine.run(data[:64])
    with torch.no_grad():
        assert (out.argmax(1) == model(data[:64]).argmax(1)).float().mean() >= 0.9
    assert any("fp8: left out" in line for line in lines)
    assert any("fp16 on onnxruntime" in n for n in result.outcome.notes)  # ORT's CPU provider runs fp16 as fp32
    written = {p.name for p in result.save(tmp_path / "out")}
    assert written == {"config.yaml", "search.md", "pareto.png", "report.txt", "search.json", "engine.mixq"}
    assert "| configuration |" in (tmp_path / "out" / "search.md").read_text()
    again: list[str] = []
    mixq.search(model, data, budget=1.0, progress=again.append, **kw)
    assert any(line.endswith("from the cache, 0 new") for line in again), again[-3:]


def test_finetune_of_a_quantized_winner_is_built_verified_and_kept_when_better():
    from mixq.search import EngineMeasurer, Evaluated, _result, agreement_metric
    from mixq.search.run import Outcome
    from mixq.zoo.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_mlp").eval()
    data = torch.randn(128, 16)
    units = find_units(model, data[:1])
    metric = agreement_metric(model, [data])
    real = EngineMeasurer(model, [data], units, ["onnxruntime"], metric, metric, 32, runs=3, profile_runs=2)
    a = ("int8", "int8")
    winner = Evaluated("search onnxruntime #1", "onnxruntime", a, 1.0, 2.0, 0.0, 100.0)  # a PTQ that lost it all
    outcome = Outcome(winner, (winner,), (), real.reference(), Budget(), True, "test", (), "exact (Pareto DP)")
    seen = []

    def finetune(net, config):
        seen.append(config)
        mixq.prepare_(net, config, mixq.QAT(), example_input=data[:1])
        net.train()
        with torch.no_grad():
            for i in range(0, 128, 32):
                net(data[i : i + 32])  # a few forward passes: the EMA ranges get initialized
        return net

    result = _result(real, outcome, units, 32, finetune, lambda _: None)
    assert seen == [result.config_list] and result.config_list
    row = result.finetuned
    assert row is not None and row.assignment == a and row.label.endswith("+ QAT fine-tune")
    assert row.metric > 90.0  # the engine of the fine-tuned model agrees with the float model
    assert result.finetune_kept == (row.ratio < 1)  # better than the PTQ row; kept only if faster than float
    assert row in result.rows
    with pytest.raises(ConfigError, match="finetune must return the model prepared"):
        _result(real, outcome, units, 32, lambda net, config: net, lambda _: None)


def test_search_rejects_bad_input_before_work():
    from mixq.zoo.models import create_model

    model = create_model("tiny_mlp")
    x = torch.randn(64, 16)
    with pytest.raises(ConfigError, match="calib_loader batch 1"):
        mixq.search(model, [x, torch.randn(8, 3)], progress=False)
    with pytest.raises(ConfigError, match="model fails on a calibration sample"):
        mixq.search(model, torch.randn(64, 5), progress=False)
    with pytest.raises(ConfigError, match="unknown precision"):
        mixq.search(model, x, choices=("int3",), progress=False)
    with pytest.raises(mixq.MixqError, match="unknown backend 'tpu'"):
        mixq.search(model, x, backends=["tpu"], progress=False)
    with pytest.raises(ConfigError, match="finalists"):
        mixq.search(model, x, finalists=0, progress=False)


# --- CLI -------------------------------------------------------------------------------------------------


def run_cli(*args, timeout=600):
    command = [sys.executable, "-m", "mixq", "search", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "lenet", "--dataset", "mnist", "--out", "o"], "--weights is required"),
        (["--model", "lenet", "--random-weights", "--dataset", "mnist", "--choices", "fp4", "--out", "o"], "fp4"),
        (
            ["--model", "lenet", "--random-weights", "--dataset", "mnist", "--eval-images", "6000", "--out", "o"],
            "exceed the 10000 test images",
        ),
        (["--model", "lenet", "--random-weights", "--dataset", "cifar10", "--out", "o"], "expects 1 input channel"),
        (
            [
                "--model",
                "lenet",
                "--random-weights",
                "--dataset",
                "mnist",
                "--backend",
                "auto",
                "openvino",
                "--out",
                "o",
            ],
            "not both",
        ),
    ],
)
def test_cli_search_checks_input_first(tmp_path, args, message):
    out = run_cli(*args, "--data-dir", str(tmp_path), timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixq search: error:") and message in lines[0], out.stderr


def test_cli_search_runs(tmp_path, data_dir):
    args = ["--model", "lenet", "--random-weights", "--dataset", "mnist", "--data-dir", str(data_dir)]
    args += ["--calib-images", "128", "--eval-images", "200", "--verify-images", "200", "--batch", "32"]
    args += ["--runs", "3", "--profile-runs", "2", "--backend", "onnxruntime", "--choices", "fp32", "int8"]
    out = run_cli(*args, "--out", str(tmp_path / "s"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "chosen:" in out.stdout and "config_list:" in out.stdout
    assert (tmp_path / "s" / "config.yaml").is_file() and (tmp_path / "s" / "pareto.png").is_file()
    assert out.stderr == ""
