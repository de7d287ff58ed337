"""SGLang adapter: an unchanged SGLang 0.5.23 (``python -m sglang.launch_server``, ``sglang serve``, ``Engine``)
with an elastic KV cache.

Applied at start-up by SGLang's own plugin group ``sglang.srt.plugins`` (``engines/autopatch.py``), which SGLang
loads in every process it starts (HTTP server, detokenizer, each scheduler), when ``ELASTIKV=1``. Only the
scheduler processes hold KV memory, and each one holds all of its own: model runner, KV buffers, token allocator
and radix tree live in the same process, one per tensor-parallel rank. So every rank books and maps its own
pages, with no socket in between. The adapter, one concern a module:

- ``targets.py``: the supported releases and every SGLang name the adapter patches or calls (:data:`TARGETS`);
- ``pools.py``: sizing from the virtual capacity, and SGLang's KV pools (MHA, MLA) as views of elastikv spaces;
- ``allocator.py``: ``ElasticTokenAllocator`` and ``ElasticPrefillBudget``: SGLang's free list, admission and
  decode capacity over the :class:`~elastikv.allocator.BlockAllocator`, the radix cache bounded;
- ``hooks.py``: which names are patched (:func:`~elastikv.engines.sglang.hooks.install`), and the scheduler's
  idle housekeeping and leak check;
- ``process.py``: this process's state (backend, settings, the caches opened here).

Refused at start-up, with the reason: SGLang versions other than :data:`SUPPORTED`, a moved patch target, KV
layouts other than SGLang's default ``nhd``, K and V of different shapes (DSA, fp4 MLA, hybrid SWA and Mamba
pools use other classes and are refused when the allocator finds a pool it did not build), PD disaggregation.

:func:`apply` checks every target before touching anything, and the contract test parses the installed SGLang's
source against the same table. Nothing here imports SGLang until :func:`apply` runs.
"""

from __future__ import annotations

import logging
import os

from elastikv.engines.patching import Patches, refuse_problems
from elastikv.engines.sglang import hooks
from elastikv.engines.sglang.allocator import ALLOC_WAIT_S, allocator_class
from elastikv.engines.sglang.process import instances
from elastikv.engines.sglang.targets import SUPPORTED, TARGETS, check_version, missing_targets, version

__all__ = [
    "ALLOC_WAIT_S",
    "SUPPORTED",
    "TARGETS",
    "allocator_class",
    "apply",
    "check_version",
    "instances",
    "missing_targets",
    "patched",
    "version",
]

log = logging.getLogger("elastikv")

_patches = Patches()  # what each patch replaced in this process


def apply() -> None:
    """Patch this process's SGLang. Idempotent; refuses, with the reason, an unsupported version or an SGLang
    whose patch targets moved. Cheap in processes that never build a KV pool (HTTP server, detokenizer)."""
    with _patches.lock:
        if _patches.installed:
            return
        text = version()  # this package's name, so a test (or a user) can stand another version in
        check_version(text)
        refuse_problems("SGLang", text, missing_targets(), ", ".join(SUPPORTED))
        hooks.install(_patches.patch)
        log.info("elastikv: SGLang %s patched in process %d (elastic KV cache)", text, os.getpid())


def patched() -> bool:
    """Whether this process's SGLang is patched."""
    return _patches.installed
