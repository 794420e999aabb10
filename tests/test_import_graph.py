"""The package's import graph: stages point one way and nothing imports in a circle.

data -> models -> train -> evaluate / export -> serve, with cli, quickstart, webui and train_command
(what ``finetune-kit train`` parses, shared by the command line and the board) on top and the
foundation (errors, config, the artifact module, ...) under everything. Function-level and
``TYPE_CHECKING`` imports count for the direction; run-time imports must also have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "finetune_kit"
RANKS = {
    "data": 1,
    "models": 2,
    "train": 3,
    "evaluate": 4,
    "export": 4,
    "serve": 5,
    "cli": 6,
    "quickstart": 6,
    "webui": 6,
    "train_command": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(module: str) -> int:
    return RANKS.get(stage(module), 0)


def edges() -> list[tuple[str, str, bool]]:
    """``(importer, imported, at_run_time)`` for every import of a finetune_kit module inside the package."""
    found = []
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith("finetune_kit"):
                    found.append((source, target, id(node) not in type_only))
    return found


def test_no_module_imports_the_package_root():
    root = [(a, b) for a, b, _ in edges() if b == "finetune_kit" and a != "finetune_kit"]
    assert not root, f"import from a leaf module instead (e.g. finetune_kit._version): {root}"


def test_stages_point_one_way():
    wrong = [
        f"{a} -> {b}"
        for a, b, _ in edges()
        if a != "finetune_kit" and (rank(b) > rank(a) or (rank(a) == rank(b) == 4 and stage(a) != stage(b)))
    ]
    assert not wrong, "imports against the stage order:\n" + "\n".join(wrong)


def test_nothing_imports_the_cli():
    assert not [(a, b) for a, b, _ in edges() if stage(b) == "cli" and stage(a) != "cli"]


def test_no_import_cycle_at_run_time():
    graph: dict[str, set[str]] = {}
    for a, b, runtime in edges():
        if runtime and a != "finetune_kit":
            graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"
