"""The package's layers (docs/architecture.md), checked on every import in ``ecif/``.

Every ``import`` and ``from ... import`` is read with ``ast``: at module level, inside
functions and under ``if TYPE_CHECKING``. Each module belongs to one layer; an import is
allowed only into its own layer or a layer listed below it in ``ALLOWED``, and imports
between modules must not form a cycle. A private name (``_x``) is not imported across
packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ecif"

# modules that import nothing from ecif: what every layer may use
BASE = {
    "ecif._version",
    "ecif.paths",
    "ecif.progress",
    "ecif.atomic",
    "ecif.distributed",
    "ecif.device",
    "ecif.options",
}

# layer -> the layers it may import from (besides itself)
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "grad": {"base"},
    "engine": {"base", "grad"},
    "companions": {"base", "grad"},  # beside the engine, on grad
    "api": {"base", "grad", "engine"},
    "data": {"base"},  # files and embeddings: no math
    "audit": {"base", "grad", "engine", "api", "data"},
    "front": {"base", "grad", "engine", "api", "data", "audit"},  # ecif/__init__, ecif.datasets
    "app": {"base", "api", "data", "audit"},  # the front ends reach the engine through api
    "cli": {"base", "api", "data", "audit", "app"},
    "main": {"base", "cli"},  # python -m ecif
}

# known edges that break a rule, (module, imported name) -> the change that removes it; keep
# this short (the test below fails when a listed edge is gone)
KNOWN: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module in ("ecif", "ecif.datasets"):
        return "front"
    if module == "ecif.__main__":
        return "main"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in ("base", "front", "main"):
        return parts[1]
    raise AssertionError(f"{module}: in no layer; add it to one in tests/test_import_layers.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of ecif (not a name inside one)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import in the file."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, here: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    tree = ast.parse(source)
    package = here if is_package else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("ecif")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not (base == "ecif" or base.startswith("ecif.")):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if is_module(sub):  # from ecif.data import layout: the module ecif.data.layout
                    out.append((sub, None, node.lineno))
                else:
                    out.append((base, a.name, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, str | None, int]]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(g: dict[str, list[tuple[str, str | None, int]]]) -> list[str]:
    bad = []
    for mod, imports in g.items():
        src = layer_of(mod)
        for target, name, line in imports:
            where = f"{mod} (line {line})"
            dst = layer_of(target)
            full = f"{target}.{name}" if name else target
            if (mod, full) in KNOWN:
                continue
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{where}: {src} imports {full} from the {dst} layer")
            if name and name.startswith("_") and not name.startswith("__"):
                if target.split(".")[:2] != mod.split(".")[:2]:
                    bad.append(f"{where}: private {full} used outside its package")
    edges = {m: {t for t, _, _ in imps} for m, imps in g.items()}
    for comp in cycles(edges):
        path = " -> ".join(one_cycle(comp, edges))
        bad.append(f"import cycle between {', '.join(comp)} (e.g. {path})")
    return bad


def one_cycle(comp: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest import path from comp[0] back to itself, inside the component."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w in inside and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_every_module_has_a_layer_and_no_import_goes_up_or_round():
    bad = violations(graph())
    assert not bad, "\n".join(bad)


def test_known_exceptions_still_exist():
    """An allow-list entry whose edge is gone must be removed (the list stays true)."""
    seen = {(m, f"{t}.{n}" if n else t) for m, imps in graph().items() for t, n, _ in imps}
    assert set(KNOWN) <= seen, set(KNOWN) - seen


@pytest.mark.parametrize(
    "module, source, expect",
    [
        ("ecif.data.layout", "from ecif.audit.folder import read_audit\n", "data imports ecif.audit.folder"),
        ("ecif.data.layout", "def f():\n    from ecif import __version__\n", "data imports ecif.__version__"),
        ("ecif.data.layout", "from ecif.engine.influence import score_pass\n", "from the engine layer"),
        ("ecif.app.detail", "import ecif.grad.solvers\n", "app imports ecif.grad.solvers"),
        ("ecif.audit.folder", "from ecif.data.readers import _x\n", "private ecif.data.readers._x"),
        ("ecif.data.layout", "import ecif.data.index\n", "import cycle between ecif.data.index, ecif.data.layout"),
    ],
)  # fmt: skip
def test_the_check_catches_upward_imports_private_names_and_cycles(module, source, expect):
    """Added to a module (at top level or inside a function), each import is reported."""
    g = graph()
    g[module] = g[module] + imports_in(source, module, False)
    if "cycle" in expect:  # and index imports layout back
        g["ecif.data.index"] = g["ecif.data.index"] + [("ecif.data.layout", None, 1)]
    found = "\n".join(violations(g))
    assert expect in found, found
