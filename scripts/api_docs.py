"""Write docs/api.md from the docstrings of mixq's public names (``__all__`` of each module below): the
signature and the docstring of each function and class, and the public methods of each class. No dependency
beyond the standard library. `python scripts/api_docs.py` rewrites the file; `--check` exits 1 when it is stale
(tests/test_api_docs.py runs that)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODULES = ["mixq", "mixq.train", "mixq.backends", "mixq.nni", "mixq.zoo.data", "mixq.zoo.download"]
OUT = ROOT / "docs" / "api.md"


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", text)  # sentinels: no address in the file


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


def _entry(module: str, name: str, obj) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"### `{module}.{name}{_signature(obj)}`", "", _doc(obj), ""]
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                continue
            target = member.fget if isinstance(member, property) else member
            sig = "" if isinstance(member, property) else _signature(member)
            lines += [f"- `{attr}{sig}`" + (" (property)" if isinstance(member, property) else ""), ""]
            if target.__doc__:
                lines += ["  " + line for line in _doc(target).splitlines()] + [""]
        return lines
    if callable(obj):
        return [f"### `{module}.{name}{_signature(obj)}`", "", _doc(obj), ""]
    return [f"### `{module}.{name}`", "", f"`{obj!r}`"[:300], ""]


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/api_docs.py` (tests/test_api_docs.py fails when this file",
        "is stale). Guides: README (quick start), docs/api-native.md, docs/own-model.md, docs/nni.md.",
        "",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", _doc(module), ""]
        for name in getattr(module, "__all__", []):
            lines += _entry(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the docstrings")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    from mixq._io import atomic_write

    with atomic_write(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
