"""Evidence check (issue 25): every results file the README cites exists, names the commit it was made at, and
is either fresh (no commit since touched the code it measures: ``src/mixq`` and the script in its command line)
or cited as of its commit (the citing line names that commit), so a number older than the code says so.

    python scripts/check_results.py            # the table; exit 1 when a citation breaks a rule
    python scripts/check_results.py --docs     # also the citations in docs/*.md

Needs the git history (a full clone). A results file names its commit in a ``commit <sha>`` or ``code <sha>``
phrase (JSON: a ``"commit"`` key); for one that names none, the commit that added it to the repository counts.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"(?:benchmarks|docs|examples/nni_examples)/results/[A-Za-z0-9_./-]*[A-Za-z0-9_/-]")
COMMIT = re.compile(r"\b(?:commit|code):?\s+`?([0-9a-f]{7,40})\b|\"commit\":\s*\"([0-9a-f]{7,40})\"")
SCRIPT = re.compile(r"\b((?:benchmarks|scripts|examples)/[A-Za-z0-9_/-]+\.(?:py|sh))\b")
MEASURED = ["src/mixq"]


@dataclass(frozen=True)
class Citation:
    source: str  # README.md:LINE
    line: str
    path: str


@dataclass(frozen=True)
class Verdict:
    citation: Citation
    commit: str | None
    later_changes: int | None  # commits after ``commit`` touching the measured code
    problem: str | None


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def citations(files: list[Path]) -> list[Citation]:
    found = []
    for f in files:
        for number, line in enumerate(f.read_text().splitlines(), 1):
            for path in CITED.findall(line):
                found.append(Citation(f"{f.relative_to(ROOT)}:{number}", line, path.rstrip("/.")))
    return found


def judge(c: Citation) -> Verdict:
    target = ROOT / c.path
    if not target.exists():
        return Verdict(c, None, None, "cited file does not exist")
    if target.is_dir():  # a folder of results: its files are judged where they are cited by name
        return Verdict(c, None, None, None)
    text = target.read_text(errors="replace")
    match = COMMIT.search(text)
    if match:
        commit = match.group(1) or match.group(2)
    else:  # the commit that added the file: the result is no newer than it
        commit = git("log", "--diff-filter=A", "--format=%h", "-1", "--", c.path)
        if not commit:
            return Verdict(c, None, None, "names no commit (a 'commit <sha>' phrase) and is not committed")
    try:
        git("cat-file", "-e", f"{commit}^{{commit}}")
    except RuntimeError:
        return Verdict(c, commit, None, f"commit {commit} is not in this repository's history")
    paths = MEASURED + [s for s in SCRIPT.findall(text) if (ROOT / s).exists()]
    later = len(git("rev-list", f"{commit}..HEAD", "--", *paths).splitlines())
    if later and commit[:7] not in c.line:
        problem = f"{later} later commits changed the code it measures; cite it as of {commit[:7]}"
        return Verdict(c, commit, later, problem)
    return Verdict(c, commit, later, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", action="store_true", help="also check the citations in docs/*.md")
    args = p.parse_args(argv)
    files = [ROOT / "README.md"] + (sorted((ROOT / "docs").glob("*.md")) if args.docs else [])
    verdicts = [judge(c) for c in citations(files)]
    print("| cited in | result | made at | later changes to its code | verdict |")
    print("|---|---|---|---|---|")
    for v in verdicts:
        later = "-" if v.later_changes is None else str(v.later_changes)
        if v.problem:
            state = v.problem
        elif v.commit is None:
            state = "folder: its files are judged where they are cited by name"
        else:
            state = "fresh" if not v.later_changes else "cited as of its commit"
        print(f"| {v.citation.source} | {v.citation.path} | {v.commit or '-'} | {later} | {state} |")
    bad = [v for v in verdicts if v.problem]
    for v in bad:
        print(f"{v.citation.source}: {v.citation.path}: {v.problem}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
