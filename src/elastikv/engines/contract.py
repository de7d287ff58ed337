"""An adapter's contract with its engine's source: the names it patches or calls, checked by parsing the source.

Each adapter lists its targets (:class:`~elastikv.engines.patching.Target`); :func:`source_problems` parses the
engine's installed (or unpacked) source files with ``ast`` and reports every target that is not bound at the top
of its module, not defined on its class, or lacks a parameter the adapter passes. Nothing of the engine is
imported, so a release can be checked on a machine where it cannot run: ``elastikv check-contract vllm|sglang
DIR`` over its unpacked wheel (``python -m elastikv.engines.contract ...`` is the same command). CI runs the same
check on the installed engines, so a release that moves a target fails CI, not users.

This module knows no adapter: the adapters' tables reach it as arguments (:mod:`~elastikv.engines.adapters` has
them by engine name), and the adapters import only :mod:`~elastikv.engines.patching`, so no import runs back.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from elastikv.engines.patching import Target


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


def check(engine: str, root: Path | None, targets_of: Callable[[str, tuple[int, ...] | None], Iterable[Target]]) -> int:
    """Print every target of ``engine``'s adapter that its source (unpacked under ``root``, else the installed
    one) lacks, or that every one is present; return 1 if any is lacking, else 0. ``targets_of(engine, release)``
    gives the adapter's targets (:func:`elastikv.engines.adapters.targets_of`): this module knows no adapter."""
    root = root if root is not None else installed_root(engine)
    release = None
    if engine == "vllm":
        release = vllm_version_in(root) if root is not None else None
        if release is None:
            raise SystemExit(f"no vllm/_version.py under {root}: which vLLM release is this?")
    found = source_problems(targets_of(engine, release), root)
    print("\n".join(found) if found else f"every {engine} target is present")
    return 1 if found else 0


if __name__ == "__main__":  # python -m elastikv.engines.contract ENGINE [DIR]: the same as `elastikv check-contract`
    from elastikv.engines.adapters import targets_of

    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m elastikv.engines.contract vllm|sglang [DIR-with-the-unpacked-source]")
    sys.exit(check(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else None, targets_of))
