"""The package's import graph: no cycles, and the core never imports its hosts or the lab.

Parsed with ast (nothing is imported), so lazy imports inside functions count as well: a
dependency hidden in a function body is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tagmoe_dist"

# The core: what an MoE layer is made of. It may import only itself and third-party libraries.
CORE = ("tagmoe_dist.config", "tagmoe_dist.tasks", "tagmoe_dist.parallel", "tagmoe_dist.gating",
        "tagmoe_dist.dispatch", "tagmoe_dist.experts", "tagmoe_dist.kernels", "tagmoe_dist.layer")
# Higher layers the core must never reach.
FORBIDDEN_FROM_CORE = ("tagmoe_dist.integrations", "tagmoe_dist.training", "tagmoe_dist.upcycle",
                       "tagmoe_dist.checkpoint", "tagmoe_dist.models", "tagmoe_dist.train",
                       "tagmoe_lab")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = PKG) -> Dict[str, Set[str]]:
    """module -> the tagmoe modules it imports (anywhere in the file)."""
    files = {_module_name(p): p for p in root.rglob("*.py")}
    graph: Dict[str, Set[str]] = {m: set() for m in files}

    def target(name: str) -> str:
        # `from pkg import mod` names a submodule when one exists; otherwise the package
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                if n.split(".")[0] in ("tagmoe_dist", "tagmoe_lab"):
                    t = target(n) if n.startswith("tagmoe_dist") else n
                    if t and t != mod:
                        graph[mod].add(t)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_under(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _parents(mod: str) -> Set[str]:
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle between concepts
    for mod, deps in graph.items():
        deps -= _parents(mod)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_core_imports_only_the_core():
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if _is_under(m, CORE)
                 for d in deps if _is_under(d, FORBIDDEN_FROM_CORE))
    assert not bad, "core modules importing higher layers:\n" + "\n".join(f"{m} -> {d}" for m, d in bad)


# The core's own layers, bottom to top: a module may import its own layer or lower ones only
# (routers below the dispatcher they feed, the dispatcher below the expert math it calls).
CORE_LAYERS = (("tagmoe_dist.config", "tagmoe_dist.tasks"), ("tagmoe_dist.parallel",),
               ("tagmoe_dist.kernels",), ("tagmoe_dist.gating",), ("tagmoe_dist.dispatch",),
               ("tagmoe_dist.experts",), ("tagmoe_dist.layer",))


def _layer_of(mod: str):
    for i, prefixes in enumerate(CORE_LAYERS):
        if _is_under(mod, prefixes):
            return i
    return None


def test_core_layers_point_down():
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() for d in deps
                 if _layer_of(m) is not None and _layer_of(d) is not None
                 and _layer_of(d) > _layer_of(m))
    assert not bad, "imports pointing up the core's layers:\n" + "\n".join(f"{m} -> {d}" for m, d in bad)


def test_installed_package_never_imports_the_lab():
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() for d in deps if d.startswith("tagmoe_lab"))
    assert not bad, f"tagmoe_dist imports lab tooling (not installed for users): {bad}"


def test_cycle_finder_finds_cycles():
    # the checker itself must be able to fail
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("src,expect", [
    ("from tagmoe_dist.integrations import deepspeed\n", "tagmoe_dist.integrations.deepspeed"),
    ("def f():\n    from ..integrations.megatron import x\n", "tagmoe_dist.integrations.megatron"),
])
def test_graph_sees_lazy_and_relative_imports(tmp_path, src, expect):
    pkg = tmp_path / "tagmoe_dist"
    (pkg / "integrations").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "integrations" / "__init__.py").write_text("")
    (pkg / "integrations" / "deepspeed.py").write_text("")
    (pkg / "integrations" / "megatron.py").write_text("x = 1\n")
    (pkg / "dispatch").mkdir()
    (pkg / "dispatch" / "__init__.py").write_text("")
    (pkg / "dispatch" / "mod.py").write_text(src)
    import tests.test_architecture as me
    old = me.ROOT
    me.ROOT = tmp_path
    try:
        assert expect in import_graph(pkg)["tagmoe_dist.dispatch.mod"]
    finally:
        me.ROOT = old
