"""Imports go one way: scheduler → workers → metrics → storage (settings live at the bottom, in
storage/settings.py, so every layer reads them). No module imports a layer above its own, even inside a
function, and no two modules import each other at module level."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"scheduler": 3, "workers": 2, "metrics": 1, "storage": 0}


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(tree: ast.AST, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in ``tree``; ``from a import b`` counts as ``a.b``
    when ``b`` is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((target if target in modules else node.module, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] in LAYERS]


def test_no_module_imports_a_layer_above_its_own() -> None:
    modules = _modules()
    upward = []
    for name, path in modules.items():
        own = LAYERS[name.split(".")[0]]
        for imported, line in _imports(ast.parse(path.read_text()), modules):
            if LAYERS[imported.split(".")[0]] > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not upward, "imports against the direction scheduler → workers → metrics → storage:\n" + "\n".join(upward)


def test_no_import_cycles_at_module_level() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        top_level = ast.Module(body=ast.parse(path.read_text()).body, type_ignores=[])
        # Only statements at the top of the module (imports inside functions run later and break no import).
        statements = [node for node in top_level.body if isinstance(node, ast.Import | ast.ImportFrom)]
        graph[name] = {imported for imported, _ in _imports(ast.Module(body=statements, type_ignores=[]), modules)
                       if imported in modules and imported != name and not name.startswith(imported + ".")}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} → {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "modules importing each other:\n" + "\n".join(cycles)


def test_command_modules_share_through_common_only() -> None:
    """`readar` command modules (run, distributed, query, ...) never import one another, even inside a function:
    what several need lives in scheduler/commands/common.py."""
    modules = _modules()
    commands = {name for name in modules if name.startswith("scheduler.commands.")}
    crossing = []
    for name in sorted(commands):
        for imported, line in _imports(ast.parse(modules[name].read_text()), modules):
            if imported in commands and imported not in (name, "scheduler.commands.common"):
                crossing.append(f"{modules[name].relative_to(ROOT)}:{line} imports {imported}")
    assert not crossing, "command modules importing each other:\n" + "\n".join(crossing)
