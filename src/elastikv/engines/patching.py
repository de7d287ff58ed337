"""What every engine adapter uses to patch its engine: the targets it names, the run-time check of them, and the
patches themselves.

An adapter lists every engine name it patches or calls as a :class:`Target`. Before touching anything it checks
them all in the running engine (:func:`runtime_problems`) and refuses, naming each one that moved
(:func:`refuse_problems`); then it installs its patches through one :class:`Patches`, which remembers what was
there before each (so a patch is installed once, however often the engine loads the plugin, and can be undone).
``contract.py`` checks the same targets against an engine's *source*, without importing it.

This module imports nothing of elastikv but its errors, and no adapter: adapters and the contract check both
depend on it, never the other way round.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from elastikv.errors import UnsupportedEngine

__all__ = ["Patch", "Patches", "Target", "refuse_problems", "resolve", "runtime_problems"]

# How an adapter's ``install(patch)`` installs one patch: ``patch(module, qualname, make)``, where ``make`` gets
# what is there now and returns its replacement.
Patch = Callable[[str, str, Callable[[Any], Any]], None]


@dataclass(frozen=True)
class Target:
    """One name an adapter relies on: ``qualname`` in ``module``, with at least these parameters."""

    module: str
    qualname: str
    params: tuple[str, ...] = ()
    optional: bool = False  # absent in some builds (checked only where the module exists)


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
    """The run-time twin of :func:`~elastikv.engines.contract.source_problems`: every target absent from the
    imported engine or lacking a parameter the adapter passes, as readable lines. Adapters call it before
    patching anything."""
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


def refuse_problems(engine: str, text: str, problems: list[str], supported: str) -> None:
    """Refuse to patch ``engine`` release ``text`` when any target moved (``problems``: one line each)."""
    if problems:
        raise UnsupportedEngine(
            f"{engine} {text} lacks what elastikv patches:\n  " + "\n  ".join(problems) + "\nelastikv supports "
            f"{engine} {supported}; run without ELASTIKV=1 or report this."
        )


class Patches:
    """The patches one adapter installed in this process: for each ``"module.qualname"``, what was there before.

    An adapter holds one, applies under :attr:`lock`, and installs only while :attr:`installed` is False (an
    engine may load its plugins more than once in a process).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._originals: dict[str, tuple[Any, str, Any]] = {}  # key -> (owner, attribute, what was there)

    @property
    def installed(self) -> bool:
        """Whether any patch is in place."""
        return bool(self._originals)

    def patch(self, module: str, qualname: str, make: Callable[[Any], Any]) -> None:
        """Replace ``qualname`` in ``module`` with ``make(current)``; once per name (a second call does nothing).
        Importing the module may raise ``ImportError`` (an optional module absent): nothing is patched then. A
        function replacement without ``__wrapped__`` gets the original there, so ``inspect.unwrap`` finds it."""
        key = f"{module}.{qualname}"
        owner: Any = importlib.import_module(module)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        current = getattr(owner, attr)
        if key in self._originals:
            return
        self._originals[key] = (owner, attr, current)
        wrapped = make(current)
        if inspect.isfunction(wrapped) and getattr(wrapped, "__wrapped__", None) is None:
            wrapped.__wrapped__ = current  # type: ignore[attr-defined]
        setattr(owner, attr, wrapped)

    def undo(self) -> None:
        """Put every original back, newest patch first. Objects the engine already built from a patched class
        keep what they were built with."""
        with self.lock:
            for owner, attr, current in reversed(list(self._originals.values())):
                setattr(owner, attr, current)
            self._originals.clear()
