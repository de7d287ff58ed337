"""Physical memory: the only code that calls the CUDA driver or mmap.

``open_backend("auto")`` gives the GPU where one is usable and host memory otherwise.
"""

from __future__ import annotations

import logging

from elastikv.config import BACKENDS, check_choice
from elastikv.errors import BackendUnavailable
from elastikv.memory.backend import Chunk, Fence, MemoryBackend, round_up
from elastikv.memory.host import HostBackend

__all__ = ["BackendUnavailable", "Chunk", "Fence", "HostBackend", "MemoryBackend", "open_backend", "round_up"]

log = logging.getLogger(__name__)


def open_backend(name: str = "auto", *, device: int = 0, host_memory: int | None = None) -> MemoryBackend:
    """The backend called ``name`` (``auto``, ``cuda`` or ``host``).

    ``auto`` picks CUDA when a GPU and cuda-bindings are usable, host memory otherwise, and says which in
    the log. ``host_memory`` sizes the host backend's pretend device (default: the machine's memory).
    """
    check_choice(name, BACKENDS, "backend")
    if name in ("auto", "cuda"):
        try:
            from elastikv.memory.cuda import CudaBackend

            return CudaBackend(device)
        except BackendUnavailable as exc:
            if name == "cuda":
                raise
            log.info("no usable GPU (%s); using host memory", exc)
    return HostBackend(host_memory)
