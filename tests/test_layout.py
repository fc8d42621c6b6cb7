"""The package layout is the architecture: no two modules of gptoss_stream import each other (directly or round a
longer loop), and the packages keep their order (weights/ at the bottom, commands/ at the top).

The module graph is read from the source with ast (every import, including those inside functions), so these
tests need neither the C library nor the optional dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "gptoss_stream"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module and package of gptoss_stream."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gptoss_stream modules `name` imports: `from P import m` counts as importing P.m when that is a module."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import gptoss_stream.x.y.attr` style: the longest module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE + ".") and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_modules():
    graph = import_graph()
    assert "gptoss_stream.weights.checkpoint" in graph
    assert graph["gptoss_stream.weights.checkpoint"] >= {"gptoss_stream.weights.layouts.published",
                                                          "gptoss_stream.weights.layouts.repacked"}
    assert "gptoss_stream.engine.kernels" in graph["gptoss_stream.engine.model"]  # `from P import module`


def test_no_module_imports_another_that_imports_it_back():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_a_cycle_is_caught(tmp_path: Path):
    """The check can fail: a package whose two modules import each other (one of them inside a function)."""
    pkg = tmp_path / PACKAGE
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "weights" / "__init__.py").write_text("")
    (pkg / "weights" / "base.py").write_text("def f():\n    from gptoss_stream.weights import layout\n")
    (pkg / "weights" / "layout.py").write_text("from gptoss_stream.weights.base import f\n")
    (pkg / "engine.py").write_text("import gptoss_stream.weights.layout\n")
    assert cycles(import_graph(pkg)) == [["gptoss_stream.weights.base", "gptoss_stream.weights.layout"]]


# Which packages each package may import (besides itself and the top-level helper modules): the data flow
# checkpoint files -> weights -> streaming -> engine, text in chat, and the commands on top of everything.
ALLOWED = {
    "weights": set(),
    "streaming": {"weights"},
    "engine": {"weights", "streaming"},
    "chat": set(),
    "server": {"weights", "streaming", "engine", "chat"},  # sits on top like commands/
    "commands": {"weights", "streaming", "engine", "chat", "server"},
}
# The edges against the flow: the RAM plan is made before the model exists and sizes the engine's scratch
# buffers with the engine's own arithmetic; `repack --dense q8` quantizes with the C kernel the engine's
# matmuls read back (one rule, one implementation). Both function-level imports; no module cycle.
EXCEPTIONS = {("gptoss_stream.streaming.budget", "gptoss_stream.engine.model"),
              ("gptoss_stream.weights.repack", "gptoss_stream.engine.kernels")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_lies_below(package: str):
    graph = import_graph()
    top = {n.split(".")[1] for n in graph if n.count(".") >= 1}
    assert top >= set(ALLOWED), f"ALLOWED names packages that do not exist: {set(ALLOWED) - top}"
    wrong = []
    for name, targets in graph.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] != package:
            continue
        for target in targets:
            other = target.split(".")[1]
            if other != package and other in ALLOWED and other not in ALLOWED[package] \
                    and (name, target) not in EXCEPTIONS:
                wrong.append(f"{name} -> {target}")
    assert not wrong, f"{package}/ reaches up or sideways: " + ", ".join(sorted(wrong))
