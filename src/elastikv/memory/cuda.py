"""GPU memory through the CUDA driver's virtual memory management, via cuda-bindings.

Each method is one driver call (``cuMemAddressReserve``, ``cuMemCreate``, ``cuMemMap``, ``cuMemSetAccess``,
``cuMemUnmap``, ``cuMemRelease``...). A failing call raises ``OutOfMemory`` when the driver says
``CUDA_ERROR_OUT_OF_MEMORY`` and ``DriverError`` (naming the call and the error) otherwise; it never aborts.

Facts this code is shaped by (measured on an H100, see DESIGN.md): the granularity is 2 MiB, the cost is per
mapping rather than per byte, ``cuMemSetAccess`` is the dominant call and the driver serialises VMM calls
across threads. So callers should map few large chunks, and no thread pool helps.

All calls run in the device's primary context, the one PyTorch uses, so tensors made here and PyTorch's
own share one address space. The context is made current on whichever thread calls (the allocator's
background thread included).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from elastikv.errors import BackendUnavailable, DriverError, OutOfMemory

try:
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - depends on the install
    cu = None


def _name(err: Any) -> str:
    try:
        got = cu.cuGetErrorName(err)
        return got[1].decode() if got[0] == cu.CUresult.CUDA_SUCCESS else str(err)
    except Exception:
        return str(err)


def _check(call: str, result: Any) -> Any:
    """Unpack a cuda-bindings ``(err, *values)`` tuple, raising a typed error for a failure."""
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfMemory(f"{call}: the GPU is out of memory (CUDA_ERROR_OUT_OF_MEMORY)")
        raise DriverError(call, _name(err))
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


class CudaFence:
    """Events recorded on each given stream; done when every one has completed."""

    def __init__(self, streams: Sequence[int]) -> None:
        self._events = []
        for stream in streams:
            event = _check("cuEventCreate", cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
            self._events.append(event)
            _check("cuEventRecord", cu.cuEventRecord(event, cu.CUstream(stream)))

    def done(self) -> bool:
        while self._events:
            err = cu.cuEventQuery(self._events[-1])[0]
            if err == cu.CUresult.CUDA_ERROR_NOT_READY:
                return False
            _check("cuEventQuery", (err,))
            _check("cuEventDestroy", cu.cuEventDestroy(self._events.pop()))
        return True

    def wait(self) -> None:
        for event in self._events:
            _check("cuEventSynchronize", cu.cuEventSynchronize(event))
        self.done()


class DeviceFence:
    """Every stream of the device: waiting synchronizes the whole context (``cuCtxSynchronize``), which covers
    all work queued before the wait on any stream, hence all work queued before the fence was taken."""

    def __init__(self, ensure_context: Callable[[], None]) -> None:
        self._ensure_context = ensure_context
        self._passed = False

    def done(self) -> bool:
        self.wait()  # no way to ask without waiting; callers wait right after taking it anyway
        return True

    def wait(self) -> None:
        if not self._passed:
            self._ensure_context()  # the maintainer's thread: make the context current there
            _check("cuCtxSynchronize", cu.cuCtxSynchronize())
            self._passed = True


class CudaChunk:
    __slots__ = ("handle", "size")

    def __init__(self, handle: Any, size: int) -> None:
        self.handle = handle
        self.size = size


class _ArrayInterface:
    """The minimal ``__cuda_array_interface__`` torch needs to wrap raw device memory without copying."""

    def __init__(self, va: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (va, False),
            "version": 3,
            "strides": None,
        }


class CudaBackend:
    name = "cuda"

    def __init__(self, device: int = 0) -> None:
        if cu is None:
            raise BackendUnavailable(
                "the CUDA backend needs cuda-bindings: pip install 'elastikv[cuda]' (or pick ELASTIKV_BACKEND=host)"
            )
        try:
            _check("cuInit", cu.cuInit(0))
        except Exception as exc:  # no driver library, no device
            raise BackendUnavailable(
                f"no usable CUDA driver ({exc}); on a machine without a GPU use ELASTIKV_BACKEND=host"
            ) from exc
        count = _check("cuDeviceGetCount", cu.cuDeviceGetCount())
        if not 0 <= device < count:
            raise BackendUnavailable(f"CUDA device {device} does not exist (this machine has {count})")
        self.device = device
        self._dev = _check("cuDeviceGet", cu.cuDeviceGet(device))
        self._ctx = _check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._dev))
        self._local = threading.local()
        self._ensure_context()

        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = device
        self.granularity = int(
            _check(
                "cuMemGetAllocationGranularity",
                cu.cuMemGetAllocationGranularity(
                    self._prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
            )
        )
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]

        uuid = bytes(_check("cuDeviceGetUuid", cu.cuDeviceGetUuid(self._dev)).bytes).hex()
        self.device_id = f"GPU-{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:32]}"
        raw_name = _check("cuDeviceGetName", cu.cuDeviceGetName(256, self._dev))
        gpu_name = raw_name.split(b"\x00", 1)[0].decode()
        self.device_label = f"{gpu_name} (cuda:{device})"
        self.torch_device = torch.device("cuda", device)

    def _ensure_context(self) -> None:
        if not getattr(self._local, "current", False):
            _check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._ctx))
            self._local.current = True

    # -- address space -------------------------------------------------------------------------------------
    def reserve(self, size: int) -> int:
        self._ensure_context()
        ptr = _check("cuMemAddressReserve", cu.cuMemAddressReserve(size, self.granularity, 0, 0))
        return int(ptr)

    def free_reservation(self, va: int, size: int) -> None:
        self._ensure_context()
        _check("cuMemAddressFree", cu.cuMemAddressFree(cu.CUdeviceptr(va), size))

    # -- physical chunks -----------------------------------------------------------------------------------
    def create(self, size: int) -> CudaChunk:
        self._ensure_context()
        handle = _check("cuMemCreate", cu.cuMemCreate(size, self._prop, 0))
        return CudaChunk(handle, size)

    def release(self, chunk: CudaChunk) -> None:
        self._ensure_context()
        _check("cuMemRelease", cu.cuMemRelease(chunk.handle))

    # -- mapping -------------------------------------------------------------------------------------------
    def map(self, va: int, size: int, chunk: CudaChunk) -> None:
        self._ensure_context()
        _check("cuMemMap", cu.cuMemMap(cu.CUdeviceptr(va), size, 0, chunk.handle, 0))

    def set_access(self, va: int, size: int) -> None:
        self._ensure_context()
        _check("cuMemSetAccess", cu.cuMemSetAccess(cu.CUdeviceptr(va), size, self._access, 1))

    def unmap(self, va: int, size: int) -> None:
        self._ensure_context()
        _check("cuMemUnmap", cu.cuMemUnmap(cu.CUdeviceptr(va), size))

    # -- device facts --------------------------------------------------------------------------------------
    def mem_info(self) -> tuple[int, int]:
        self._ensure_context()
        free, total = _check("cuMemGetInfo", cu.cuMemGetInfo())
        return int(free), int(total)

    def record_fence(self, streams: Sequence[int] = ()) -> CudaFence | DeviceFence:
        self._ensure_context()
        return CudaFence(streams) if streams else DeviceFence(self._ensure_context)

    def tensor(self, va: int, nbytes: int) -> torch.Tensor:
        self._ensure_context()
        return torch.as_tensor(_ArrayInterface(va, nbytes), device=self.torch_device)

    def close(self) -> None:
        # The primary context is PyTorch's too: retained once here, released once, never destroyed.
        if getattr(self, "_ctx", None) is not None:
            cu.cuDevicePrimaryCtxRelease(self._dev)
            self._ctx = None
