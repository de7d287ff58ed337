"""An adapter's contract with its engine's source: the names it patches or calls, checked by parsing the source.

Each adapter lists its ``TARGETS``; :func:`source_problems` parses the engine's installed (or unpacked) source
files with ``ast`` and reports every target that is not bound at the top of its module, not defined on its
class, or lacks a parameter the adapter passes. Nothing of the engine is imported, so a release can be checked
on a machine where it cannot run: ``python -m elastikv.engines.contract vllm|sglang DIR`` over its unpacked
wheel. CI runs the same check on the installed engines, so a release that moves a target fails CI, not users.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """One name an adapter relies on: ``qualname`` in ``module``, with at least these parameters."""

    module: str
    qualname: str
    params: tuple[str, ...] = ()
    optional: bool = False  # absent in some builds (checked only where the module exists)


def module_source(module: str, root: Path | None = None) -> ast.Module | None:
    """The module's syntax tree: from the installed package, or from an unpacked release under ``root``."""
    if root is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a parent package that fails to import, or is absent
            spec = None
        path = Path(spec.origin) if spec is not None and spec.origin else None
    else:
        base = root.joinpath(*module.split("."))
        path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)
    if path is None or path.suffix != ".py":
        return None
    return ast.parse(path.read_text(), filename=str(path))


def top_level_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                names[alias.asname or alias.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + ([a.vararg.arg] if a.vararg else [])


def source_problems(targets: Iterable[Target], root: Path | None = None) -> list[str]:
    """Every target the source (installed, or unpacked under ``root``) does not provide, one line each."""
    problems = []
    for t in targets:
        tree = module_source(t.module, root)
        if tree is None:
            if not t.optional:
                problems.append(f"{t.module}: module missing")
            continue
        head, *rest = t.qualname.split(".")
        node = top_level_names(tree).get(head)
        if node is None:
            problems.append(f"{t.module}: no top-level {head}")
            continue
        if rest:
            if not isinstance(node, ast.ClassDef):
                problems.append(f"{t.module}.{head}: not a class here")
                continue
            methods = {n.name: n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            found = methods.get(rest[0])
            if found is None:
                problems.append(f"{t.module}.{t.qualname}: not defined on the class")
                continue
            node = found
        if t.params:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                problems.append(f"{t.module}.{t.qualname}: not a function here")
                continue
            lacking = [p for p in t.params if p not in params(node)]
            if lacking:
                problems.append(f"{t.module}.{t.qualname}: lacks parameters {lacking}")
    return problems


def resolve(target: Target) -> Any | None:
    """The object ``target`` names, imported (the engine's own process), or None if it is optional and absent."""
    try:
        obj: Any = importlib.import_module(target.module)
    except ImportError:
        if target.optional:
            return None
        raise
    for part in target.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def runtime_problems(targets: Iterable[Target]) -> list[str]:
    """The run-time twin of :func:`source_problems`: every target absent from the imported engine or lacking a
    parameter the adapter passes, as readable lines. Adapters call it before patching anything."""
    problems: list[str] = []
    for t in targets:
        where = f"{t.module}.{t.qualname}"
        try:
            obj = resolve(t)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{where}: missing ({exc})")
            continue
        if obj is None or not t.params:
            continue
        try:
            names = set(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            continue
        lacking = [p for p in t.params if p not in names]
        if lacking:
            problems.append(f"{where}: no parameter {', '.join(lacking)}")
    return problems


def installed_root(package: str) -> Path | None:
    """The directory holding ``package`` as installed, found without importing it (SGLang's ``__init__`` needs
    its whole dependency set; its files can be read without any)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def vllm_version_in(root: Path) -> tuple[int, ...] | None:
    """The vLLM release whose source lies under ``root`` (its ``vllm/_version.py``), without importing it."""
    path = root / "vllm" / "_version.py"
    if not path.exists():
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version_tuple__"
                                                for t in node.targets):  # fmt: skip
            value = ast.literal_eval(node.value)
            return tuple(x for x in value if isinstance(x, int))
    return None


def _targets(engine: str, root: Path | None) -> tuple[Target, ...]:
    if engine == "vllm":
        from elastikv.engines import vllm

        found = vllm_version_in(root) if root is not None else None
        if found is None:
            raise SystemExit(f"no vllm/_version.py under {root}: which vLLM release is this?")
        return vllm.targets_for(found)
    if engine == "sglang":
        from elastikv.engines.sglang import TARGETS as SGLANG_TARGETS

        return SGLANG_TARGETS
    raise SystemExit(f"unknown engine {engine!r}: vllm or sglang")


if __name__ == "__main__":  # python -m elastikv.engines.contract ENGINE [DIR]
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m elastikv.engines.contract vllm|sglang [DIR-with-the-unpacked-source]")
    engine = sys.argv[1]
    root = Path(sys.argv[2]) if len(sys.argv) == 3 else installed_root(engine)
    found = source_problems(_targets(engine, root), root)
    print("\n".join(found) if found else f"every {sys.argv[1]} target is present")
    sys.exit(1 if found else 0)
