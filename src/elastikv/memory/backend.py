"""The contract every physical-memory backend obeys.

It mirrors the CUDA driver's virtual memory management, because that is what the GPU gives us and the host
backend can copy it exactly:

    va = reserve(size)              # address space only, no memory
    chunk = create(size)            # physical memory, not yet visible anywhere
    map(va, size, chunk)            # make the chunk back [va, va+size)
    set_access(va, size)            # allow reads and writes (until then touching it faults)
    unmap(va, size); release(chunk) # and back again
    free_reservation(va, size)

Sizes and addresses are multiples of ``granularity``. A backend knows nothing of blocks or pages: those are
``space.py``'s business. A failing call raises a typed error and changes nothing: ``OutOfMemory`` when the
device is full, ``DriverError`` for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Fence(Protocol):
    """Marks a point in the device's work queue(s). ``done()`` once all work before it has completed."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...


class DoneFence:
    """A fence that has always passed: for work that is synchronous (host memory), or that the other side has
    already waited for (``PeerPages.fence``: every worker drained its device before it returns)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class Chunk(Protocol):
    """An opaque handle to one physical allocation."""

    @property
    def size(self) -> int: ...


class MemoryBackend(Protocol):
    name: str
    """``"cuda"`` or ``"host"``."""
    device_id: str
    """Stable identity of the physical device: the GPU's UUID, or ``host:<machine id>``."""
    device_label: str
    """For people: ``"NVIDIA H100 80GB HBM3 (cuda:0)"``."""
    granularity: int
    """Every size and address passed in must be a multiple of this (2 MiB on an H100)."""

    def reserve(self, size: int) -> int: ...

    def free_reservation(self, va: int, size: int) -> None: ...

    def create(self, size: int) -> Chunk: ...

    # A chunk is whatever this backend's create() returned (typed Any: each backend has its own handle).
    def map(self, va: int, size: int, chunk: Any) -> None: ...

    def set_access(self, va: int, size: int) -> None: ...

    def unmap(self, va: int, size: int) -> None: ...

    def release(self, chunk: Any) -> None: ...

    def mem_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes of the device, as the driver (or the OS) sees them now."""
        ...

    def record_fence(self, streams: Sequence[int] = ()) -> Fence:
        """A fence after all work queued so far on ``streams`` (raw stream handles). Empty: every stream of the
        device, whoever made it (waiting synchronizes the device): what an engine that has not declared its
        streams gets, so that a kernel on a stream elastikv was never told about is waited for too."""
        ...

    def tensor(self, va: int, nbytes: int) -> torch.Tensor:
        """A ``uint8`` tensor over ``[va, va+nbytes)`` on this device, sharing the memory (no copy)."""
        ...

    def close(self) -> None: ...


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
