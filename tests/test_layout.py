"""The layout's dependency rule, read from the code's imports (every ``import``, at module level or inside a
function: a lazy import is a dependency too).

    protos  <-  runtime  <-  partitioner and the agents  <-  splitglm

Arrows point at what is imported; nothing imports upwards. The agents (device_agent, edge_node,
cloud_service) never import each other nor partitioner; inside partitioner, ``plan`` may use ``eval``, never
the reverse; and no two files import each other, directly or around a longer circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "runtime", "partitioner", "device_agent", "edge_node", "cloud_service", "splitglm")
AGENTS = ("device_agent", "edge_node", "cloud_service")
# What each top-level package may import of the project, besides itself.
ALLOWED = {
    "protos": set(),
    "runtime": {"protos"},
    "partitioner": {"protos", "runtime"},
    **{agent: {"protos", "runtime"} for agent in AGENTS},
    "splitglm": set(PACKAGES) - {"splitglm"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[module_name(path)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` names a.b when that is a module, else a)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m.split(".")[0] in PACKAGES and m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_the_tree_is_read():
    g = graph()
    assert "runtime.terminal" in g and "runtime.owner" in g and "edge_node.router" in g
    assert "runtime.terminal" in set().union(*(g[m] for m in g if m.startswith("cloud_service")))


def test_packages_import_only_downwards():
    wrong = []
    for name, deps in graph().items():
        top = name.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the dependency rule:\n" + "\n".join(sorted(wrong))


def test_eval_never_imports_plan():
    wrong = [f"{name} imports {dep}" for name, deps in graph().items() if name.startswith("partitioner.eval")
             for dep in deps if dep.startswith("partitioner.plan")]
    assert not wrong, "\n".join(wrong)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package's __init__ that re-exports its own modules is not a cycle of files
    g = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph().items()}
    assert cycles(g) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
