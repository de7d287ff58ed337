"""Physical memory: the only code that calls the CUDA driver or mmap.

``open_backend("auto")`` gives the GPU where one is usable and host memory otherwise.
"""

from __future__ import annotations

import logging

from elastikv.config import BACKENDS, check_choice
from elastikv.errors import BackendUnavailable
from elastikv.memory.backend import Chunk, DoneFence, Fence, MemoryBackend, round_up
from elastikv.memory.host import HostBackend, physical_memory

__all__ = [
    "BackendUnavailable",
    "Chunk",
    "DoneFence",
    "Fence",
    "HostBackend",
    "MemoryBackend",
    "open_backend",
    "physical_memory",
    "round_up",
    "used_bytes",
]

log = logging.getLogger(__name__)


def used_bytes(backend: MemoryBackend) -> int:
    """Device memory in use now: the driver's count on a GPU (every process's); on the host, what the kernel
    holds for this backend's chunks (the machine-wide free count moves with everything else running)."""
    if isinstance(backend, HostBackend):
        return backend.allocated_bytes()
    free, total = backend.mem_info()
    return total - free


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
