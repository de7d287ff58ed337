"""The house's rules, checked on the source (docs/architecture.md, "Layers"): every module of ``src/elastikv`` sits
on one floor, imports only from its own floor or below, no import circle exists, and no file outgrows one sitting.
Imports under ``if TYPE_CHECKING:`` are left out: they never run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "elastikv"

# Floors, lowest first: a module's floor is that of the longest prefix of its dotted name listed here.
FLOORS: dict[str, int] = {
    "errors": 0, "config": 0, "procfs": 0, "ports": 0, "children": 0, "lifecycle": 0,
    "memory": 1,
    "page_plan": 2, "space": 2, "peer_pages": 2, "reserve": 2, "free_pool": 2,
    "ledger_rows": 3, "ledger_models": 3, "ledger": 3, "budget": 3, "maintainer": 3, "allocator": 3,
    "instance": 4,
    "engines": 5,
    "serving": 6,
    "router": 7,
    "bench": 8, "ray": 8,
    "cli": 9, "status_view": 9, "__init__": 9, "__main__": 9,
}  # fmt: skip
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _floor(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise AssertionError(f"{module} is on no floor: add it to FLOORS here and to docs/architecture.md")


def _runtime_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The elastikv modules ``path`` imports when it runs (at import or inside a function)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
                base = f"elastikv.{base}" if base else "elastikv"
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("elastikv."):
                continue
            name = name.removeprefix("elastikv.")
            while name and name not in known:  # `from elastikv.x import y`: y may be a name, not a module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _runtime_imports(p, m, set(modules)) for m, p in modules.items()}


def test_no_import_runs_up_a_floor() -> None:
    upward = [
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in _graph().items()
        for d in deps
        if _floor(d) > _floor(m) and not m.startswith(d + ".") and not d.startswith(m + ".")
    ]
    assert not upward, "imports that run up a floor:\n" + "\n".join(sorted(upward))


def test_no_import_circle() -> None:
    graph = _graph()
    for m in graph:  # a package's __init__ may re-export its own modules: not a circle through the package
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_source_file_reads_in_one_sitting() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_engines_serving_and_router_reach_memory_only_through_instance() -> None:
    """The design's rule: ``memory/`` (the driver and the host arena) is used by the core below the adapters
    (space, allocator, instance); engines, the embedded engine and the router get backends through
    ``instance.py``, so a change of backend touches one floor."""
    outside = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if d.split(".")[0] == "memory" and m.split(".")[0] in ("engines", "serving", "router")
    ]
    assert not outside, "reach into memory/ past instance.py:\n" + "\n".join(sorted(outside))
