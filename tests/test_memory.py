"""The memory backends' contract, on real memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tests.conftest import used_bytes

from elastikv.errors import DriverError, OutOfMemory
from elastikv.memory import HostBackend, MemoryBackend, open_backend


def test_round_trip_holds_data(backend: MemoryBackend) -> None:
    g = backend.granularity
    va = backend.reserve(4 * g)
    assert va % g == 0
    chunk = backend.create(2 * g)
    backend.map(va + g, 2 * g, chunk)
    backend.set_access(va + g, 2 * g)
    view = backend.tensor(va + g, 2 * g)
    view.fill_(7)
    assert int(view.sum()) == 7 * 2 * g
    backend.unmap(va + g, 2 * g)
    backend.release(chunk)
    backend.free_reservation(va, 4 * g)


def test_mapping_shows_in_device_memory(backend: MemoryBackend) -> None:
    g = backend.granularity
    va = backend.reserve(8 * g)
    before = used_bytes(backend)
    chunk = backend.create(8 * g)
    backend.map(va, 8 * g, chunk)
    backend.set_access(va, 8 * g)
    assert used_bytes(backend) - before >= 8 * g
    backend.unmap(va, 8 * g)
    backend.release(chunk)
    assert used_bytes(backend) - before < 8 * g
    backend.free_reservation(va, 8 * g)


def test_host_release_returns_memory_to_the_kernel() -> None:
    be = HostBackend(total_bytes=64 * 1024**2)
    va = be.reserve(16 * 1024**2)
    chunk = be.create(16 * 1024**2)
    be.map(va, chunk.size, chunk)
    be.set_access(va, chunk.size)  # pre-faults: memory is committed here
    assert be.allocated_bytes() == 16 * 1024**2
    be.tensor(va, chunk.size).fill_(1)
    be.unmap(va, chunk.size)
    be.release(chunk)
    assert be.allocated_bytes() == 0
    # A reused chunk comes back zeroed, like fresh device memory.
    chunk = be.create(16 * 1024**2)
    be.map(va, chunk.size, chunk)
    be.set_access(va, chunk.size)
    assert int(be.tensor(va, chunk.size).sum()) == 0
    be.unmap(va, chunk.size)
    be.release(chunk)
    be.free_reservation(va, 16 * 1024**2)
    be.close()


def test_host_device_size_is_enforced() -> None:
    be = HostBackend(total_bytes=8 * 1024**2)
    a = be.create(6 * 1024**2)
    with pytest.raises(OutOfMemory, match="exceed the device size"):
        be.create(4 * 1024**2)
    be.release(a)
    be.release(be.create(8 * 1024**2))
    be.close()


def test_misaligned_sizes_are_driver_errors() -> None:
    be = HostBackend(total_bytes=8 * 1024**2)
    for bad in (0, -2 * 1024**2, 1000):
        with pytest.raises(DriverError, match="multiple of"):
            be.create(bad)
        with pytest.raises(DriverError, match="multiple of"):
            be.reserve(bad)
    be.close()


def test_cuda_backend_says_why_it_cannot_run() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be seen here")
    from elastikv.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"ELASTIKV_BACKEND=host|cuda-bindings"):
        open_backend("cuda")
    assert open_backend("auto").name == "host"


def test_touching_unmapped_memory_faults() -> None:
    """The host backend is faithful: an unmapped page is not readable (the GPU's illegal address)."""
    code = textwrap.dedent(
        """
        from elastikv.memory import HostBackend
        be = HostBackend(total_bytes=4 * 1024**2)
        va = be.reserve(2 * 1024**2)
        c = be.create(2 * 1024**2); be.map(va, c.size, c); be.set_access(va, c.size)
        t = be.tensor(va, c.size); t[0] = 1
        be.unmap(va, c.size); be.release(c)
        print("unmapped", flush=True)
        print(int(t[0]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "unmapped" in proc.stdout
    assert proc.returncode == -11, (proc.returncode, proc.stderr[-500:])
