"""The project's shape: imports flow one way, nothing imports in a circle, no file grows huge.

Read from the source with ``ast`` (every import counts, including the lazy ones inside
functions and those under ``TYPE_CHECKING``), so a new upward import or circle fails here
before it confuses a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each package may import, besides itself (docs/architecture.md draws the same picture).
ALLOWED: dict[str, set[str]] = {
    "stealsim": set(),
    "defense": {"stealsim"},
    "victim_server": {"defense", "stealsim"},
    "attacker": {"stealsim"},
    "experiments": {"attacker", "defense", "victim_server", "stealsim"},
    "cli": {"experiments", "attacker", "defense", "victim_server", "stealsim"},
    "benchmarks": {"cli", "experiments", "attacker", "defense", "victim_server", "stealsim"},
}
# `python -m stealsim` needs stealsim/__main__.py; it only hands over to the CLI above.
ENTRY_POINT_EXCEPTIONS = {("stealsim.__main__", "cli")}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (absolute and relative imports alike)."""
    is_package = path.name == "__init__.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            imported.add(module)
            # `from package import module` imports the submodule too
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    return {module for module in imported if module.split(".")[0] in ALLOWED}


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(module: str) -> str | None:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        return module or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {resolve(module) for module in _imports(name, path)}
        graph[name] = {target for target in targets if target is not None and target != name}
    return graph


def test_packages_import_only_downward() -> None:
    upward = []
    for module, targets in _graph().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package] \
                    and (module, other) not in ENTRY_POINT_EXCEPTIONS:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layout (docs/architecture.md):\n" + "\n".join(sorted(upward))


def test_no_import_circle() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, f"modules that import each other in a circle: {circles}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_file_over_the_size_limit(package: str) -> None:
    too_long = {str(path.relative_to(ROOT)): count for path in (ROOT / package).rglob("*.py")
                if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"split these (over {MAX_LINES} lines): {too_long}"
