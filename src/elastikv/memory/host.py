"""Host memory with the same contract as the CUDA driver's VMM.

- ``reserve``: ``mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)``: address space, no memory.
- ``create``: a slice of one sparse ``memfd`` that this backend owns (one file, not one per chunk, so a
  large cache does not run out of file descriptors). Nothing is allocated until the chunk is touched.
- ``map``: ``mmap(MAP_FIXED|MAP_SHARED)`` of that slice over the reservation, with no access yet.
- ``set_access``: ``mprotect(READ|WRITE)`` then ``MADV_POPULATE_WRITE``, so that the memory is really
  committed here (an out-of-memory shows up as ``OutOfMemory`` now, not as a SIGBUS at first touch).
- ``unmap``: a fresh ``PROT_NONE`` reservation mapped over the range (``MAP_FIXED`` replaces atomically).
- ``release``: ``fallocate(PUNCH_HOLE)`` gives the pages back to the kernel.

Touching an address that is reserved but not mapped is a SIGSEGV, exactly as an unmapped GPU page is an
illegal address: the host backend is a faithful stand-in, which is why every test can run the real mapping
code without a GPU.

``total_bytes`` makes the backend behave like a device of that size: ``create`` refuses (``OutOfMemory``)
once the chunks alive would exceed it. Default: the machine's physical memory.

Python's ``mmap`` module cannot map at a fixed address, so the few libc calls go through ``ctypes``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from elastikv.config import format_bytes
from elastikv.errors import ConfigError, DriverError, OutOfMemory
from elastikv.memory.backend import DoneFence, round_up

# Linux values, the same on x86_64 and aarch64.
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MADV_POPULATE_WRITE = 23
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HOST_GRANULARITY = 2 * 1024**2  # the GPU's, so that geometries and page sizes match on both backends

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.memset.restype = ctypes.c_void_p
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def _raise_errno(call: str) -> None:
    err = ctypes.get_errno()
    if err == errno.ENOMEM:
        raise OutOfMemory(f"{call}: the host is out of memory ({os.strerror(err)})")
    raise DriverError(call, errno.errorcode.get(err, str(err)), os.strerror(err))


def _mmap(va: int, size: int, prot: int, flags: int, fd: int, offset: int, call: str) -> int:
    addr = _libc.mmap(va or None, size, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        _raise_errno(call)
    return int(addr)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def physical_memory() -> int:
    """The machine's physical memory (MemTotal), in bytes."""
    return _meminfo()["MemTotal"]


def available_memory() -> int:
    """Host memory the kernel can give without swapping (MemAvailable), in bytes: pinned (locked) memory of
    every process, other engines' sleeping weights included, is not in it."""
    return _meminfo()["MemAvailable"]


HOST_RESERVE = 0.05  # of the host's physical memory: pinning that would leave less available is refused


def pin_refusal(nbytes: int) -> str | None:
    """Why pinning ``nbytes`` of host memory now would leave the host short, or None. Pinned (page-locked) memory
    of every process, other engines' sleeping weights included, is not in MemAvailable and cannot be swapped out:
    pinning past what is available less ``HOST_RESERVE`` of the machine invites the kernel's out-of-memory killer
    (ten 8B engines pinning 15 GiB each want 150 GiB; the H200 machine has 128)."""
    available = available_memory()
    if nbytes <= available - int(physical_memory() * HOST_RESERVE):
        return None
    left = format_bytes(max(0, available - nbytes))
    return (f"pinning {format_bytes(nbytes)} would leave {left} of host memory available, less than "
            f"{HOST_RESERVE:.0%} of it (other engines' sleeping weights are pinned too)")  # fmt: skip


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
        except OSError:
            pass
    return socket.gethostname()


@dataclass(frozen=True)
class HostChunk:
    offset: int
    size: int


class HostBackend:
    name = "host"
    granularity = HOST_GRANULARITY

    def __init__(self, total_bytes: int | None = None) -> None:
        physical = physical_memory()
        if total_bytes is not None and total_bytes <= 0:
            raise ConfigError(f"host backend: total_bytes must be positive, got {total_bytes}")
        self.total_bytes = physical if total_bytes is None else total_bytes
        self.device_id = f"host:{_machine_id()}"
        self.device_label = f"host memory ({format_bytes(self.total_bytes)})"
        self._fd = os.memfd_create("elastikv-kv", os.MFD_CLOEXEC)
        self._lock = threading.Lock()  # guards the offset book below; the syscalls themselves are thread-safe
        self._file_size = 0
        self._free_offsets: dict[int, list[int]] = {}  # chunk size -> released offsets to reuse
        self._live_bytes = 0
        self._closed = False

    # -- address space -------------------------------------------------------------------------------------
    def reserve(self, size: int) -> int:
        self._check_aligned(size, "reserve size")
        # Over-reserve by one granule so the start can be aligned like the GPU's (2 MiB).
        raw = _mmap(
            0,
            size + self.granularity,
            PROT_NONE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
            -1,
            0,
            "mmap(reserve)",
        )
        va = round_up(raw, self.granularity)
        if va > raw:
            _libc.munmap(raw, va - raw)
        tail = raw + size + self.granularity - (va + size)
        if tail:
            _libc.munmap(va + size, tail)
        return va

    def free_reservation(self, va: int, size: int) -> None:
        if _libc.munmap(va, size) != 0:
            _raise_errno("munmap(reservation)")

    # -- physical chunks -----------------------------------------------------------------------------------
    def create(self, size: int) -> HostChunk:
        self._check_aligned(size, "chunk size")
        with self._lock:
            if self._live_bytes + size > self.total_bytes:
                raise OutOfMemory(
                    f"host backend: creating a {format_bytes(size)} chunk would exceed the device size "
                    f"{format_bytes(self.total_bytes)} ({format_bytes(self._live_bytes)} in use)"
                )
            reuse = self._free_offsets.get(size)
            if reuse:
                offset = reuse.pop()
            else:
                offset = self._file_size
                os.ftruncate(self._fd, offset + size)
                self._file_size = offset + size
            self._live_bytes += size
        return HostChunk(offset, size)

    def release(self, chunk: HostChunk) -> None:
        if _libc.fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, chunk.offset, chunk.size) != 0:
            _raise_errno("fallocate(PUNCH_HOLE)")
        with self._lock:
            self._free_offsets.setdefault(chunk.size, []).append(chunk.offset)
            self._live_bytes -= chunk.size

    # -- mapping -------------------------------------------------------------------------------------------
    def map(self, va: int, size: int, chunk: HostChunk) -> None:
        if size != chunk.size:
            raise DriverError("map", "EINVAL", f"size {size} differs from the chunk's {chunk.size}")
        _mmap(va, size, PROT_NONE, MAP_SHARED | MAP_FIXED, self._fd, chunk.offset, "mmap(MAP_FIXED)")

    def set_access(self, va: int, size: int) -> None:
        if _libc.mprotect(va, size, PROT_READ | PROT_WRITE) != 0:
            _raise_errno("mprotect")
        if _libc.madvise(va, size, MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: a kernel older than 5.14; touch the pages instead
                _raise_errno("madvise(MADV_POPULATE_WRITE)")
            _libc.memset(va, 0, size)

    def unmap(self, va: int, size: int) -> None:
        _mmap(va, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0, "mmap(unmap)")

    # -- device facts --------------------------------------------------------------------------------------
    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            free = self.total_bytes - self._live_bytes
        return min(free, _meminfo()["MemAvailable"]), self.total_bytes

    def allocated_bytes(self) -> int:
        """Bytes the kernel really holds for this backend's chunks (the memfd's allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    def record_fence(self, streams: Sequence[int] = ()) -> DoneFence:
        return DoneFence()

    def tensor(self, va: int, nbytes: int) -> torch.Tensor:
        buf = (ctypes.c_uint8 * nbytes).from_address(va)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _check_aligned(self, n: int, what: str) -> None:
        if n <= 0 or n % self.granularity:
            raise DriverError("host", "EINVAL", f"{what} {n} is not a positive multiple of {self.granularity}")
