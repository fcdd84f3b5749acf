"""The house's layering, read from the AST of every module in src/mixq (function-level imports included):

(a) no import cycle between modules;
(b) no import going up a layer or sideways between siblings (e.g. one backend importing another), with the
    layer order written in the package docstring of src/mixq/__init__.py (the numbered list there).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mixq

SRC = Path(mixq.__file__).parent

# Imports that break the rules today and are being removed by other work; each entry is (importer, imported)
# as module names, with the reason. The lead empties this list: an entry that no longer occurs fails the
# test below, so the list can only shrink.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    # Emptied: the last entry, the cuda engine <-> compile cycle, went with backends/cuda/runners.py (issue 23).
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    return _imports_in(name, path.name == "__init__.py", path.read_text(), str(path))


def _imports_in(name: str, is_package: bool, source: str, filename: str = "<source>") -> set[str]:
    """The mixq modules the module ``name`` imports anywhere in ``source`` (``from X import a``: X.a where that is a
    module, else X; ``importlib.import_module("mixq...")`` and ``__import__("mixq...")`` with a literal name)."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in MODULES else module)
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                out.add(target.value)
    return {m for m in out if m in MODULES and m != name}


def _dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layers() -> list[list[str]]:
    """The numbered list of the package docstring: one list of names (under ``mixq.``) per layer, bottom up."""
    doc = mixq.__doc__ or ""
    layers = []
    for line in doc.splitlines():
        m = re.match(r"\s*(\d+)\. (.*)", line)
        if m:
            assert int(m.group(1)) == len(layers) + 1, f"layer list out of order at {line!r}"
            names = re.findall(r"``([\w.]+)``", m.group(2).split(":")[0])
            layers.append([n if n == "mixq" else f"mixq.{n}" for n in names])
    return layers


LAYERS = _layers()
NAMES = {name: i for i, names in enumerate(LAYERS) for name in names}


def _owner(module: str) -> str | None:
    """The most specific listed name covering ``module`` (``mixq`` covers the package file only)."""
    if module == "mixq":
        return "mixq"
    best = None
    for name in NAMES:
        covers = name != "mixq" and (module == name or module.startswith(name + "."))
        if covers and (best is None or len(name) > len(best)):
            best = name
    return best


def _violations() -> dict[tuple[str, str], str]:
    found = {}
    for importer, imported in sorted((a, b) for a, bs in GRAPH.items() for b in bs):
        a, b = _owner(importer), _owner(imported)
        if a == b:
            continue
        la, lb = NAMES[a], NAMES[b]
        if lb > la:
            found[importer, imported] = f"up: {a} (layer {la + 1}) imports {b} (layer {lb + 1})"
        elif lb == la:
            found[importer, imported] = f"sideways: {a} imports its sibling {b} (layer {la + 1})"
    return found


def _cycles() -> list[list[str]]:
    """Every strongly connected set of modules with more than one member (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_docstring_lists_layers_and_every_module_has_one():
    assert len(LAYERS) >= 10 and all(LAYERS), LAYERS
    assert len(NAMES) == sum(len(names) for names in LAYERS), "a name is listed twice"
    unplaced = [m for m in MODULES if _owner(m) is None]
    assert not unplaced, f"modules in no layer of mixq's docstring: {unplaced}"
    missing = [n for n in NAMES if n not in MODULES and not any(m.startswith(n + ".") for m in MODULES)]
    assert not missing, f"layers name modules that do not exist: {missing}"


def test_no_import_cycle():
    known = {frozenset(pair) for pair in KNOWN_VIOLATIONS if "cycle" in KNOWN_VIOLATIONS[pair]}
    cycles = [c for c in _cycles() if not any(pair <= set(c) for pair in known) or len(c) > 2]
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_goes_up_a_layer_or_sideways():
    found = {k: v for k, v in _violations().items() if k not in KNOWN_VIOLATIONS}
    assert not found, "\n".join(f"{a} -> {b}: {why}" for (a, b), why in found.items())


# Pairs the layer order allows but the house forbids (DEVELOPERS.md): backends build from the Q/DQ ONNX and
# the calibration file alone, never from the fake-quant modules or the config that made them.
FORBIDDEN = [
    ("mixq.backends", "mixq.quantization"),
    ("mixq.backends", "mixq.observers"),
    ("mixq.backends", "mixq.config"),
]


def _forbidden(graph) -> list[str]:
    def under(module, name):
        return module == name or module.startswith(name + ".")

    return sorted(
        f"{a} -> {b}"
        for a, bs in graph.items()
        for b in bs
        for low, high in FORBIDDEN
        if under(a, low) and under(b, high)
    )


def test_backends_never_import_the_quantization_layer():
    found = _forbidden(GRAPH)
    assert not found, f"backends import the quantization layer: {found}"


def test_known_violations_still_exist():
    """An entry fixed elsewhere must leave the list, so that it cannot hide a new violation."""
    gone = [f"{a} -> {b}" for a, b in KNOWN_VIOLATIONS if b not in GRAPH.get(a, set())]
    assert not gone, f"gone, remove from KNOWN_VIOLATIONS: {gone}"


def test_the_checks_catch_what_they_are_for():
    """The rules themselves, on a made-up graph: an upward import, a sibling import and a cycle are found."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {"mixq.spec": {"mixq.config"}, "mixq.config": {"mixq.spec"}, "mixq.export": {"mixq.quantization"}}
        GRAPH.update({"mixq.quantization": set()})
        v = _violations()
        assert v["mixq.spec", "mixq.config"].startswith("up:")
        assert v["mixq.export", "mixq.quantization"].startswith("sideways:")
        assert ["mixq.config", "mixq.spec"] in _cycles()
        assert _forbidden({"mixq.backends.openvino.engine": {"mixq.quantization.model"}}) == [
            "mixq.backends.openvino.engine -> mixq.quantization.model"
        ]
    finally:
        GRAPH = saved


def test_the_import_reader_sees_every_form():
    """Absolute, relative (package and module), function-level and importlib imports of mixq modules."""
    source = """
import mixq.spec
from ... import config
from ...quantization import model
from ..base import register_backend

def later():
    import importlib
    from mixq import export
    importlib.import_module("mixq.report")
    __import__("mixq.auto")
    importlib.import_module(computed_name)
"""
    found = _imports_in("mixq.backends.onnxruntime.engine", False, source)
    assert found == {
        "mixq.spec",
        "mixq.config",
        "mixq.quantization.model",
        "mixq.backends.base",
        "mixq.export",
        "mixq.report",
        "mixq.auto",
    }
