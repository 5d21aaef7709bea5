"""The package's module graph: no import cycle; Ray only under ikd_sweep/sweep/, MLflow only in
ikd_sweep/tracking.py and analysis/collect.py (both packages checked); the trainer imports
neither."""

from __future__ import annotations

import ast
from pathlib import Path

import analysis
import ikd_sweep

PKG = Path(ikd_sweep.__file__).parent
ANALYSIS = Path(analysis.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> modules it imports, top-level and inside functions alike (a deferred import
    hides a cycle from Python, not from a reader)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                # `from ikd_sweep import teacher` imports the module ikd_sweep.teacher
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert {"ikd_sweep.trainer", "ikd_sweep.trial", "ikd_sweep.teacher"} <= set(graph)
    assert "ikd_sweep.teacher" in graph["ikd_sweep.trial"]  # the graph does see imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _users(lib: str) -> set[str]:
    """Modules of ikd_sweep and analysis that import `lib` (at the top or inside a function)."""
    return {_module_name(path) for root in (PKG, ANALYSIS) for path in root.rglob("*.py")
            if any(n == lib or n.startswith(lib + ".") for n in _imports(path))}


def test_ray_only_in_the_sweep_package_and_mlflow_only_in_its_two_modules():
    ray = _users("ray")
    assert ray and all(m.startswith("ikd_sweep.sweep.") for m in ray), ray
    assert "ikd_sweep.sweep.events" not in ray  # the live view reads it without Ray
    assert _users("mlflow") == {"ikd_sweep.tracking", "analysis.collect"}


def test_the_trainer_imports_neither_ray_nor_mlflow():
    graph = import_graph()
    reach, todo = set(), ["ikd_sweep.trainer"]
    while todo:  # the trainer and every module of ikd_sweep it imports, however deep
        mod = todo.pop()
        if mod not in reach:
            reach.add(mod)
            todo += graph[mod]
    for mod in reach:
        path = PKG.parent / (mod.replace(".", "/") + ".py")
        libs = {n.split(".")[0] for n in _imports(path)}
        assert not libs & {"ray", "mlflow"}, f"{mod} (imported by the trainer) imports {libs}"


def test_the_cli_imports_no_heavy_library():
    # `ikd-sweep --help` must answer at once: the heavy libraries load inside the commands.
    import subprocess
    import sys

    heavy = ("torch", "ray", "mlflow", "transformers", "pandas", "scipy", "sklearn")
    code = ("import sys, ikd_sweep.cli; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "", f"importing ikd_sweep.cli imports {out.stdout.strip()}"
