"""Generate docs/api.md, the API reference, from the public API's docstrings.

    python scripts/api_docs.py            # writes docs/api.md
    python scripts/api_docs.py --check    # exit 1 if docs/api.md differs from what the docstrings give

Standard library only (``inspect`` and ``ast``): pdoc writes HTML and mkdocstrings needs a mkdocs site, while the
reference should be one Markdown file that can be compared byte for byte (tests/test_api_docs.py does, in CI).
Each namespace in ``NAMESPACES`` is documented through its ``__all__``; an object is written out in full the
first time it appears and linked after that. Constants and class attributes take their docstring from the string
literal right after their assignment (the attribute-docstring convention), else from the comment ending it.
The output holds no addresses and no absolute paths.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import importlib.util
import inspect
import io
import itertools
import re
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

# The public namespaces, in reading order. Backend modules import no runtime at import time, so this is cheap.
NAMESPACES = (
    "mixq",
    "mixq.nni",
    "mixq.backends",
    "mixq.export",
    "mixq.search",
    "mixq.calibration",
    "mixq.train",
    "mixq.zoo.data",
    "mixq.zoo.download",
)

HEADER = """\
# API reference

Generated from the docstrings by `python scripts/api_docs.py`; do not edit by hand. CI checks that this file is
up to date (`tests/test_api_docs.py`, run by `scripts/test.sh`). Each namespace is documented through its
`__all__`: signature, where the object is defined, the full docstring, and for classes their public methods and
properties (with those inherited from other mixq classes). An object exported by several namespaces is written
out once and linked from the others. Guides: README (quick start), `docs/api-native.md`, `docs/own-model.md`,
`docs/nni.md`.
"""

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`~?\.?([^`]+)`")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SIMPLE = (str, int, float, bool, type(None), bytes)
_LONG_SIGNATURE = 100
_ANNOTATED_ONLY = object()  # a class attribute that is annotated but has no value


def _sanitize(text: str) -> str:
    """``text`` without memory addresses or this machine's paths (the output must not depend on where it runs)."""
    text = _ADDRESS.sub("", text)
    for path, name in ((str(ROOT), "<repo>"), (sys.prefix, "<prefix>"), (str(Path.home()), "~")):
        if path and path != "/":
            text = text.replace(path, name)
    return text


def own_docstring(obj) -> str:
    """The docstring written for ``obj`` itself (a class's, not its base's; not dataclass's generated one)."""
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc:
        try:
            generated = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        except (TypeError, ValueError):
            generated = None
        if doc == generated:
            doc = None
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _targets(stmt: ast.stmt) -> list[str]:
    """The plain names an assignment statement binds."""
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def _comments(source: str) -> dict[int, str]:
    """``{line: comment text}`` of every ``#`` comment in ``source``."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return {}
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def attribute_docs(body: list[ast.stmt], source: str) -> dict[str, str]:
    """``{name: doc}`` for the assignments in ``body``: the string literal right after one (its docstring),
    else the comment that ends its last line."""
    found, comments = {}, _comments(source)
    for stmt, nxt in itertools.pairwise([*body, None]):
        literal = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        doc = inspect.cleandoc(nxt.value.value) if literal else comments.get(stmt.end_lineno, "")
        for target in _targets(stmt):
            if doc:
                found[target] = doc
    return found


def _parsed(obj) -> tuple[ast.Module, str] | None:
    """The syntax tree and source of a module or class (None where the source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(obj))
        return ast.parse(source), source
    except (OSError, TypeError, SyntaxError):
        return None


def constant_home(name: str, exported_from: str) -> tuple[str, str]:
    """The module that assigns the constant ``name`` exported by ``exported_from`` and its doc, found by following
    the ``from ... import`` statements (not by what happens to be loaded: the output must not depend on that)."""
    module_name, seen = exported_from, set()
    while module_name not in seen:
        seen.add(module_name)
        module = importlib.import_module(module_name)
        parsed = _parsed(module)
        if parsed is None:
            break
        tree, source = parsed
        if any(name in _targets(stmt) for stmt in tree.body):
            return module_name, attribute_docs(tree.body, source).get(name, "")
        imported = [
            (stmt, alias.name)
            for stmt in tree.body
            if isinstance(stmt, ast.ImportFrom)
            for alias in stmt.names
            if (alias.asname or alias.name) == name
        ]
        if not imported:
            break
        stmt, name = imported[-1]
        package = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
        module_name = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), package)
    return exported_from, ""


def _is_documented_object(obj) -> bool:
    return inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)


def docstring_of(namespace: str, name: str) -> str:
    """The docstring of ``name`` as ``namespace`` exports it (empty when it has none)."""
    obj = getattr(importlib.import_module(namespace), name)
    if _is_documented_object(obj):
        return own_docstring(obj)
    return constant_home(name, namespace)[1]


def missing_docstrings(namespace: str = "mixq") -> list[str]:
    """The names in ``namespace.__all__`` that have no docstring."""
    module = importlib.import_module(namespace)
    return [name for name in module.__all__ if not docstring_of(namespace, name).strip()]


class _Annotation(str):
    """A string annotation (``from __future__ import annotations``) that prints without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _annotation_text(annotation) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _unquoted(sig: inspect.Signature) -> inspect.Signature:
    params = [
        p.replace(annotation=_Annotation(p.annotation)) if isinstance(p.annotation, str) else p
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    return sig.replace(parameters=params, return_annotation=_Annotation(ret) if isinstance(ret, str) else ret)


def _format_signature(name: str, obj) -> str | None:
    try:
        sig = _unquoted(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    if inspect.isclass(obj):
        sig = sig.replace(return_annotation=inspect.Signature.empty)
    one_line = _sanitize(f"{name}{sig}")
    if len(one_line) <= _LONG_SIGNATURE:
        return one_line
    parts, kinds = [], [p.kind for p in sig.parameters.values()]
    for i, param in enumerate(sig.parameters.values()):
        first_keyword_only = param.kind is param.KEYWORD_ONLY and (i == 0 or kinds[i - 1] is not param.KEYWORD_ONLY)
        if first_keyword_only and inspect.Parameter.VAR_POSITIONAL not in kinds[:i]:
            parts.append("*")
        parts.append(str(param))
        if param.kind is param.POSITIONAL_ONLY and (i + 1 == len(kinds) or kinds[i + 1] is not param.POSITIONAL_ONLY):
            parts.append("/")
    ret = "" if sig.return_annotation is sig.empty else f" -> {_annotation_text(sig.return_annotation)}"
    return _sanitize(f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){ret}")


def _fenced(text: str, lang: str = "") -> list[str]:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{lang}", text, fence, ""]


def _docstring_block(doc: str, say_missing: bool = True) -> list[str]:
    if not doc:
        return ["*No docstring.*", ""] if say_missing else []
    return _fenced(_sanitize(_ROLE.sub(r"``\1``", doc)), "text")


def _plain(value) -> bool:
    """Whether ``repr(value)`` is the value written out: a scalar, a dataclass, or a tuple/list of scalars."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SIMPLE) for v in value)
    return isinstance(value, _SIMPLE) or dataclasses.is_dataclass(value)


def _value_repr(value) -> str | None:
    """A short, deterministic repr of a constant, or None when it has none worth printing."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, frozenset) and all(isinstance(v, _SIMPLE) for v in value):
        text = f"frozenset({{{', '.join(sorted(map(repr, value)))}}})" if value else "frozenset()"
    elif _plain(value):
        text = repr(value)
    else:
        return None
    text = _sanitize(text)
    return text if len(text) <= 200 and "<" not in text else None


def _kind(obj) -> str:
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "exception"
        return "dataclass" if dataclasses.is_dataclass(obj) else "class"
    if inspect.ismodule(obj):
        return "module"
    return "function"


def _class_members(cls) -> list[str]:
    """The public methods, properties and class attributes of ``cls`` and of its mixq bases (dataclass fields
    where they have a doc beyond the signature)."""
    lines, seen = [], set()
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith("mixq"):
            continue
        parsed = _parsed(owner)
        attr_docs = {}
        if parsed is not None and parsed[0].body and isinstance(parsed[0].body[0], ast.ClassDef):
            attr_docs = attribute_docs(parsed[0].body[0].body, parsed[1])
        annotations = inspect.get_annotations(owner)
        names = list(annotations) + [a for a in owner.__dict__ if a not in annotations]
        for member in names:
            if member.startswith("_") or member in seen or (member in fields and member not in attr_docs):
                continue  # a field without a doc of its own is all said by the signature
            seen.add(member)
            raw = owner.__dict__.get(member, _ANNOTATED_ONLY)
            if inspect.isclass(raw):
                continue  # nested helper classes are documented where they are exported, if they are
            inherited = "" if owner is cls else f", inherited from `{owner.__module__}.{owner.__qualname__}`"
            if isinstance(raw, property):
                ret = inspect.signature(raw.fget).return_annotation if raw.fget else inspect.Signature.empty
                returns = "" if ret is inspect.Signature.empty else f" → `{_annotation_text(ret)}`"
                lines += [f"#### `{cls.__name__}.{member}`{returns} *(property{inherited})*", ""]
                lines += _docstring_block(inspect.cleandoc(raw.__doc__ or ""), say_missing=False)
            elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
                label = {staticmethod: "staticmethod", classmethod: "classmethod"}.get(type(raw), "method")
                lines += [f"#### `{cls.__name__}.{member}` *({label}{inherited})*", ""]
                signature = _format_signature(member, getattr(cls, member))
                if signature:
                    lines += _fenced(signature, "python")
                lines += _docstring_block(inspect.getdoc(getattr(cls, member)) or "", say_missing=False)
            else:
                ann = annotations.get(member)
                ann_text = f": {_annotation_text(ann)}" if ann is not None else ""
                value = None if raw is _ANNOTATED_ONLY else _value_repr(raw)
                value_text = f" = {value}" if value else ""
                label = "field" if member in fields else "attribute"
                lines += [f"#### `{cls.__name__}.{member}{ann_text}{value_text}` *({label}{inherited})*", ""]
                lines += _docstring_block(attr_docs.get(member, ""), say_missing=False)
    return lines


def _entry(namespace: str, name: str, obj) -> list[str]:
    qualified = f"{namespace}.{name}"
    lines = [f'<a id="{qualified}"></a>', "", f"### `{qualified}`", ""]
    if _is_documented_object(obj):
        if inspect.ismodule(obj):
            lines += [f"*module* `{obj.__name__}`", ""]
        else:
            alias = "" if obj.__qualname__ == name else f" as `{obj.__qualname__}`"
            lines += [f"*{_kind(obj)}*, defined in `{obj.__module__}`{alias}", ""]
        if inspect.isclass(obj):
            bases = [b for b in obj.__bases__ if b is not object]
            if bases:
                lines += ["Bases: " + ", ".join(f"`{b.__module__}.{b.__qualname__}`" for b in bases), ""]
        signature = None if inspect.ismodule(obj) else _format_signature(name, obj)
        if signature:
            lines += _fenced(signature, "python")
        lines += _docstring_block(own_docstring(obj))
        if inspect.isclass(obj):
            if issubclass(obj, enum.Enum):
                lines += ["Members: " + ", ".join(f"`{m.name}`" for m in obj), ""]
            lines += _class_members(obj)
    else:
        home, doc = constant_home(name, namespace)
        lines += [f"*constant* of type `{type(obj).__name__}`, defined in `{home}`", ""]
        value = _value_repr(obj)
        if value:
            lines += _fenced(f"{name} = {value}", "python")
        lines += _docstring_block(doc)
    return lines


def _key(obj, namespace: str, name: str):
    """What makes two exports the same object (constants by home module and name, since ints are shared)."""
    if _is_documented_object(obj):
        return ("object", id(obj))
    return ("constant", constant_home(name, namespace)[0], name)


def generate() -> str:
    """The text of docs/api.md for the docstrings as they are now."""
    lines = [HEADER, "## Namespaces", ""]
    lines += [f"- [`{ns}`](#{ns.replace('.', '-')})" for ns in NAMESPACES]
    lines.append("")
    written: dict[tuple, str] = {}
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        lines += [f'<a id="{namespace.replace(".", "-")}"></a>', "", f"## `{namespace}`", ""]
        lines += _docstring_block(own_docstring(module))
        names = list(getattr(module, "__all__", ()))
        if names:
            lines += ["Exports: " + ", ".join(f"[`{n}`](#{namespace}.{n})" for n in names), ""]
        for name in names:
            obj = getattr(module, name)
            key = _key(obj, namespace, name)
            if key in written:
                target = written[key]
                lines += [f'<a id="{namespace}.{name}"></a>', "", f"### `{namespace}.{name}`", ""]
                lines += [f"The same object as [`{target}`](#{target}).", ""]
                continue
            written[key] = f"{namespace}.{name}"
            lines += _entry(namespace, name, obj)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale instead of writing it")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print("docs/api.md is stale: run python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    from mixq._io import atomic_write

    with atomic_write(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
