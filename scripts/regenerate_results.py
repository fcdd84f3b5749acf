"""Regenerate the results the README cites (issue 25: README numbers at HEAD).

Each results file records the command that made it (a ``command: `...` `` line). This script lists every
results file the README cites (as ``scripts/check_results.py`` finds them), reads that command and, for the
ones that run on this CPU machine, runs it again from the repository root, so the file is rewritten at HEAD
with its machine, versions and commit. Results made on the GPU device (a ``gpu``/``h100``/``h200``/``ddp``/
``qat`` path, or a command naming CUDA) are listed with their command, to run there (``device`` tool); so are
results made on another CPU class (AVX2, AVX-512 VNNI, AMX: the file's machine line), commands that write
somewhere else than the file, and files that record no command (they cannot be regenerated as they stand).

    python scripts/regenerate_results.py              # the plan: what would run, what needs the GPU, what can't
    python scripts/regenerate_results.py --run        # run the CPU commands (stale ones first; long: see --only)
    python scripts/regenerate_results.py --run --only demo-quick transformers-cpu

``--stale`` keeps only the files ``check_results.py`` calls older than the code they measure. A command that
names a path outside this repository (``/work/shared/data``, ``../shared/data``) runs with ``MIXQ_DATA`` from
the environment instead: the data location is the machine's, not the result's. Commands run with this
interpreter: run the script with the environment the result was made in (the torchvision venv of
``docs/own-model.md`` for ``transformers-cpu``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_results  # the sibling script: the README's citations and their freshness

ROOT = check_results.ROOT
COMMAND = [  # how results files record their command, in order of preference
    re.compile(r"[Cc]ommand:?\s*`([^`]+)`"),  # command: `...`
    re.compile(r"^[Cc]ommand:\s*([^`\n]+?)(?:\s+\([^()]*\))?\s*$", re.M),  # command: ... (a trailing remark)
    re.compile(r"^    ((?:[A-Z_]+=\S+ )*(?:python3?|bash) .+)$", re.M),  # an indented command block
]


def recorded_command(text: str) -> str | None:
    for pattern in COMMAND:
        found = pattern.search(text)
        if found:
            return found.group(1).strip()
    return None


DEVICE_PATH = re.compile(r"gpu|h100|h200|ddp|/qat/")
MACHINE = re.compile(r"^[Mm]achine:.*$", re.M)


def cpu_class(text: str) -> str | None:
    """amx | avx512_vnni | avx2: the x86 class a CPU description names by its flags (None: it names none)."""
    for flag in ("amx", "avx512_vnni", "avx2"):
        if flag in text.lower():
            return flag
    return None


def this_cpu() -> str:
    try:
        return cpu_class(Path("/proc/cpuinfo").read_text()) or "unknown"
    except OSError:
        return "unknown"


def out_path(command: str) -> str | None:
    words = command.split()
    return words[words.index("--out") + 1] if "--out" in words[:-1] else None


def plan(stale_only: bool) -> list[tuple[str, str, str | None]]:
    """(results path, "cpu" when it runs here or why not, command) for each README-cited results file, once."""
    rows, seen = [], set()
    for citation in check_results.citations([ROOT / "README.md"]):
        path = citation.path
        target = ROOT / path
        if path in seen or not target.is_file():
            continue
        seen.add(path)
        verdict = check_results.judge(citation)
        if stale_only and not (verdict.later_changes or verdict.problem):
            continue
        text = target.read_text(errors="replace")
        command = recorded_command(text)
        machine = MACHINE.search(text)
        made_on = cpu_class(machine.group(0)) if machine else None
        if command is None:
            rows.append((path, "records no command", None))
        elif DEVICE_PATH.search(path) or "cuda" in command.lower() or "PYTHONPATH=src" in command:
            rows.append((path, "needs the GPU device", command))
        elif out_path(command) not in (path, None) and not path.startswith(str(out_path(command))):
            rows.append((path, f"its command writes {out_path(command)}, not this file: copy its table in", command))
        elif made_on and made_on != this_cpu():
            rows.append((path, f"made on a CPU with {made_on} (this one: {this_cpu()}): run it on such a CPU", command))
        else:
            rows.append((path, "cpu", command))
    return rows


def runnable(command: str) -> list[str]:
    """``bash -c`` of the command (it may chain with ``&&``), with ``MIXQ_DATA`` assignments left to this machine's
    environment and ``python`` meaning this interpreter."""
    command = re.sub(r"(^|\s)MIXQ_DATA=\S+\s+", r"\1", command)
    command = re.sub(r"(^|&&\s*|\s)python3?\s", lambda m: f"{m.group(1)}{shlex.quote(sys.executable)} ", command)
    return ["bash", "-c", command]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run the CPU commands (otherwise only print the plan)")
    p.add_argument("--only", nargs="+", default=None, help="keep results whose path contains one of these")
    p.add_argument("--stale", action="store_true", help="only results older than the code they measure")
    args = p.parse_args(argv)
    rows = plan(args.stale)
    if args.only:
        rows = [r for r in rows if any(word in r[0] for word in args.only)]
    for path, where, command in rows:
        print(f"{path}: {'runs here' if where == 'cpu' else where}" + (f": `{command}`" if command else ""))
    if not args.run:
        return 0
    failed = 0
    for path, where, command in rows:
        if where != "cpu":
            continue
        words = runnable(command)
        print(f"\n== {path}: {words[-1]}", flush=True)
        start = time.time()
        done = subprocess.run(words, cwd=ROOT)
        print(f"== {path}: exit {done.returncode} after {time.time() - start:.0f} s", flush=True)
        failed += done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
