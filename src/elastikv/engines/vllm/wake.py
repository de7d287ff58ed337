"""vLLM's wake with its weight copies overlapped (``ELASTIKV_VLLM_OVERLAP_WAKE=on``; off by default until it is
measured on a GPU: ``benchmarks/vllm_sleep.py --overlap-wake``).

vLLM's ``CuMemAllocator.wake_up`` (0.26 and 0.32 alike) brings each sleeping allocation back in turn: map it
(create the physical memory, map it, set access), then copy its host backup with a synchronous ``cudaMemcpy``.
The copy engine idles while the next allocation is mapped, and the host waits for each copy: an 8B (15 GiB, a
few hundred allocations) woke in 0.354 s under elastikv on the H100 against a 0.292 s copy floor (2026-12-07).
Here, while ``wake_up`` runs, the module's ``libcudart`` answers ``cudaMemcpy`` by queueing the copy on one side
stream (``cudaMemcpyAsync``), so that mapping the next allocation overlaps this one's copy. What vLLM wakes, in
which order and with which tags, is unchanged; only when each copy is waited for.

Invariants: when the wrapped ``wake_up`` returns or raises, every copy it queued has completed (the stream is
synchronized in a ``finally``) and the module's ``libcudart`` is vLLM's own again; every host backup a queued copy
reads stays referenced until then (vLLM drops its own reference as soon as it has asked for the copy, which with
a synchronous copy was safe and with a queued one would let PyTorch's pinned-memory cache hand the block out
while the copy still reads it).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from elastikv.engines.patching import Target

log = logging.getLogger("elastikv")

MODULE = "vllm.device_allocator.cumem"
TARGETS: tuple[Target, ...] = (
    Target(MODULE, "CuMemAllocator.wake_up", ("self", "tags"), optional=True),
    Target(MODULE, "libcudart", optional=True),
)
_lock = threading.Lock()  # one wake at a time swaps the module's libcudart


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    patch(MODULE, "CuMemAllocator.wake_up", wrap_wake_up)


class _QueuedCopies:
    """vLLM's ``libcudart`` during a wake, but for ``cudaMemcpy``, which queues the copy on ``stream``."""

    def __init__(self, real: Any, stream: torch.cuda.Stream) -> None:
        self._real = real
        self._stream = stream
        self.queued = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def cudaMemcpy(self, dst: Any, src: Any, count: int) -> None:  # vLLM's name for it
        from cuda.bindings import runtime as cudart

        (err,) = cudart.cudaMemcpyAsync(_address(dst), _address(src), count,
                                        cudart.cudaMemcpyKind.cudaMemcpyDefault, self._stream.cuda_stream)  # fmt: skip
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaMemcpyAsync of {count} bytes while waking vLLM's weights failed: {err!r}")
        self.queued += 1


def _address(pointer: Any) -> int:
    value = getattr(pointer, "value", pointer)  # an int, or a ctypes.c_void_p
    return int(value or 0)


def wrap_wake_up(original: Callable[..., Any]) -> Callable[..., Any]:
    def wake_up(self: Any, tags: list[str] | None = None) -> Any:
        cumem: Any = importlib.import_module(MODULE)
        real = cumem.libcudart
        if real is None or not torch.cuda.is_available():
            return original(self, tags)
        backups = [d.cpu_backup_tensor for d in self.pointer_to_data.values()
                   if getattr(d, "cpu_backup_tensor", None) is not None]  # fmt: skip
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        with _lock:
            queued = _QueuedCopies(real, stream)
            cumem.libcudart = queued
            try:
                return original(self, tags)
            finally:
                cumem.libcudart = real
                stream.synchronize()
                log.debug("elastikv: vLLM's wake queued %d copies (%d host backups held until done)",
                          queued.queued, len(backups))  # fmt: skip
                del backups

    return wake_up
