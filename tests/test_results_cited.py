"""The README's evidence (issue 25): every results file it cites exists, names its commit, and is fresh or cited
as of that commit (scripts/check_results.py, which CI runs here)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
    pytest.skip("needs the git history of a clone", allow_module_level=True)

spec = importlib.util.spec_from_file_location("check_results", ROOT / "scripts" / "check_results.py")
check_results = importlib.util.module_from_spec(spec)
sys.modules["check_results"] = check_results  # dataclasses look their module up there
spec.loader.exec_module(check_results)


def test_every_result_the_readme_cites_is_fresh_or_cited_as_of_its_commit(capsys):
    assert check_results.main([]) == 0, capsys.readouterr().err


def test_a_stale_result_cited_without_its_commit_is_named():
    # demo-cpu.md was made at ecb51a5; src/mixq changed after it
    path = "docs/results/demo-cpu.md"
    stale = check_results.judge(check_results.Citation("X.md:1", f"see `{path}`", path))
    assert stale.commit == "ecb51a5" and stale.later_changes > 0
    assert "cite it as of ecb51a5" in stale.problem
    cited = check_results.judge(check_results.Citation("X.md:1", f"see `{path}` (at ecb51a5)", path))
    assert cited.problem is None


def test_a_missing_result_is_named():
    missing = check_results.judge(check_results.Citation("X.md:1", "", "benchmarks/results/no-such-run.md"))
    assert missing.problem == "cited file does not exist"


def test_the_regeneration_plan_sorts_every_cited_result_by_where_it_can_run(capsys):
    """scripts/regenerate_results.py: one line per cited results file; GPU results go to the device, results made
    on another CPU class are not rerun here, and a file without a recorded command says so."""
    spec = importlib.util.spec_from_file_location("regenerate_results", ROOT / "scripts" / "regenerate_results.py")
    regenerate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regenerate)
    rows = {path: where for path, where, _ in regenerate.plan(stale_only=False)}
    cited = {c.path for c in check_results.citations([ROOT / "README.md"]) if (ROOT / c.path).is_file()}
    assert set(rows) == cited
    assert rows["benchmarks/results/transformers-gpu-h100.md"] == "needs the GPU device"
    for cpu in ("avx2", "amx"):  # each is rerun only on its own CPU class
        path = f"benchmarks/results/transformers-cpu-{cpu}.md"
        assert (rows[path] == "cpu") == (regenerate.this_cpu() == cpu), (path, rows[path])
    assert all(where == "records no command" for path, where in rows.items() if path.endswith(".json"))
    assert regenerate.main([]) == 0 and len(capsys.readouterr().out.splitlines()) == len(rows)
