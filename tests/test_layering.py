"""No module-level import cycle anywhere in the package, and the CLI layers stay in one direction."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shrinkcli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.parse(path.read_text()).body:          # top level only: lazy imports are allowed
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _module_level_imports(path, set(files)) - {name} for name, path in files.items()}


def test_no_module_level_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_lower_layers_never_import_the_cli_or_the_stages():
    graph = _graph()
    upper = {"shrinkcli.cli", "shrinkcli.app", "shrinkcli.commands", "shrinkcli.options", "shrinkcli.api"}
    for module, imports in graph.items():
        if module.startswith(("shrinkcli.stages", "shrinkcli.bench")) or module in upper or module in ("shrinkcli", "shrinkcli.__main__"):
            continue
        bad = {m for m in imports if m in upper or m.startswith("shrinkcli.stages")}
        assert not bad, f"{module} imports {sorted(bad)}"
