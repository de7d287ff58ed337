"""Shared fixtures. Every backend-level test runs on the host backend here and on CUDA on the GPU machine."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest
import torch

from elastikv.memory import Chunk, HostBackend, MemoryBackend
from elastikv.space import KVGeometry

GPU_SKIP_REASON = "needs a CUDA GPU and cuda-bindings; run scripts/gpu-check on the device machine"


def cuda_usable() -> bool:
    try:
        from elastikv.memory.cuda import CudaBackend

        CudaBackend(0).close()
        return torch.cuda.is_available()
    except Exception:
        return False


_CUDA = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _CUDA
    if not any("gpu" in item.keywords for item in items):
        return
    if _CUDA is None:
        _CUDA = cuda_usable()
    if not _CUDA:
        skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


HOST_TOTAL = 512 * 1024**2  # the host backend's pretend device: small, so out-of-memory is easy to reach


def open_test_backend(kind: str) -> MemoryBackend:
    if kind == "host":
        return HostBackend(total_bytes=HOST_TOTAL)
    from elastikv.memory.cuda import CudaBackend

    torch.cuda.init()
    return CudaBackend(0)


BACKENDS = ["host", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[MemoryBackend]:
    be = open_test_backend(request.param)
    yield be
    be.close()


@pytest.fixture(params=["interleaved", "per-layer"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# 64 KiB blocks: 32 blocks in a 2 MiB chunk, so pages fill and empty quickly in tests. One layer keeps a page
# at 4 MiB (host pages are populated at ~1.5 GB/s on CI's machine); MULTI has layers enough to check layouts.
SMALL = KVGeometry(num_layers=1, block_shape=(16, 8, 128), dtype=torch.float32)
MULTI = KVGeometry(num_layers=3, block_shape=(16, 8, 128), dtype=torch.float32)


@contextlib.contextmanager
def device_filled(backend: MemoryBackend, leave: int) -> Iterator[list[Chunk]]:
    """Take real physical chunks until only ``leave`` bytes of the device are free; give them back after.

    This is how tests make the driver (or the host backend's device size) say out-of-memory for real.
    """
    chunks: list[Chunk] = []
    try:
        size = 1024**3
        while size >= backend.granularity:
            free, _ = backend.mem_info()
            while free - size >= leave:
                try:
                    chunks.append(backend.create(size))
                except Exception:
                    break
                free, _ = backend.mem_info()
            size //= 2
            size -= size % backend.granularity
        yield chunks
    finally:
        for c in chunks:
            backend.release(c)


def used_bytes(backend: MemoryBackend) -> int:
    """Device bytes in use right now outside PyTorch's caching allocator (on a GPU: by every process, so tests
    compare differences).

    PyTorch's cache is not elastikv's: the test's own tensors (block ids, data, a ``.sum()``) come from segments
    that PyTorch keeps after the tensors die, 2 MiB at a time for small ones. On the H200 a small segment made while
    a test filled the device stayed cached and read as 2 MiB "held after rollback and close" (issue 20, item 8).
    """
    free, total = backend.mem_info()
    cached = torch.cuda.memory_reserved() if backend.name == "cuda" else 0
    return total - free - cached


def pytest_ignore_collect(collection_path: object, config: pytest.Config) -> bool | None:
    """tests/sglang_env runs only inside the SGLang test environment (tests/test_sglang.py starts it there)."""
    if getattr(collection_path, "name", "") == "sglang_env" and os.environ.get("EKV_TEST_SGLANG_ENV") != "1":
        return True
    return None


# Every process this session starts inherits this mark (tests that drop ELASTIKV_* variables keep it), so the
# session can check at its end that nothing it started is still running: engines, routers and servers must die
# with whatever started them (elastikv.children), in a test that passes or fails alike.
SESSION_MARK = "EKV_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")


def leftover_processes() -> list[str]:
    """Processes started by this session (they carry its mark) that still run, as "pid: command line"."""
    import psutil

    mark, me, found = os.environ[SESSION_MARK], os.getpid(), []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(SESSION_MARK) == mark:
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])[:200]}")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get(SESSION_MARK, "").split("-")[0] != str(os.getpid()):
        return  # a pytest inside a test (tests/sglang_env): its parent session checks
    deadline = time.monotonic() + 10.0  # processes being stopped right now get a moment
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        import psutil

        for line in left:
            with contextlib.suppress(psutil.Error, ValueError):
                psutil.Process(int(line.split(":")[0])).kill()
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "processes started by the tests were still running at the end (killed now):\n  " + "\n  ".join(left)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
