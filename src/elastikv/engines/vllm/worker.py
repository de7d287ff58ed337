"""vLLM adapter, worker side, shared by every supported vLLM: the process that owns the KV buffers.

One worker per tensor-parallel rank. ``determine_available_memory`` reports the *virtual capacity* (the device's
total memory, in whole pages), never a free-memory snapshot; vLLM sizes its block count from it. The real KV
allocation (the one made inside ``Worker.initialize_from_config``; profiling allocations pass through to vLLM)
is built by the generation module for this vLLM (``kv_*.py``) over a scratch-backed
:class:`~elastikv.space.KVSpace`, which :func:`serve_pages` then serves to the engine core (``peer_pages.py``).

Unmapping and GPU work (async scheduling, CUDA graphs, FlashAttention on any stream): the engine core frees
blocks when vLLM's scheduler does, and vLLM frees a block only once no step that reads it can still be
*launched*. A step already launched may still be queued or running on the GPU; so before a page is unmapped,
the page server waits for every kernel queued on the device, on every stream (``PageServer.drain``:
``torch.cuda.synchronize``). Unmapped slots are backed by a scratch chunk, so a padded or dummy slot that
points at a free block (CUDA graph padding, warm-up with made-up block ids) reads or writes scratch, never an
unmapped address; vLLM's null block (block 0) is mapped at start and never unmapped.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from elastikv import lifecycle
from elastikv.config import Settings, format_bytes
from elastikv.engines.patching import Target
from elastikv.errors import UnsupportedEngine
from elastikv.instance import (
    Holding,
    MemoryBackend,
    backend_for,
    open_holding,
    other_bytes,
    resident_bytes,
    weight_bytes,
)
from elastikv.page_plan import PagePlan
from elastikv.peer_pages import PageServer
from elastikv.space import KVGeometry, KVSpace

log = logging.getLogger("elastikv")

TARGETS: tuple[Target, ...] = (
    Target("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", ("self", "kv_cache_config")),
    Target("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", ("self",)),
    Target("vllm.v1.worker.gpu_worker", "Worker.get_kv_cache_spec", ("self",)),
)
# Only on vLLM's CPU platform: importing cpu_worker elsewhere replaces torch.cuda's events and streams with CPU
# stand-ins for the whole process (its cpu/shm module does so at import), which would break a GPU worker.
CPU_TARGETS: tuple[Target, ...] = (
    Target("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", ("self",), optional=True),
)


def on_cpu() -> bool:
    """Whether this vLLM runs on its CPU platform (decided by vLLM; no CPU-only module is imported to ask)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    patch("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", _wrap_initialize_from_config)
    patch("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", _wrap_determine_available_memory)
    if on_cpu():
        patch("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", _wrap_determine_available_memory)


@dataclass
class _WorkerCache:
    """This process's elastic KV cache (one per worker process)."""

    backend: MemoryBackend
    space: KVSpace | None = None
    server: PageServer | None = None
    rank: int = 0

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.space is not None:
            self.space.close()
        self.backend.close()


_worker: _WorkerCache | None = None
_real_allocation = threading.local()  # .worker is set while Worker.initialize_from_config runs


def _worker_backend(device: torch.device) -> _WorkerCache:
    global _worker
    if _worker is None:
        backend = backend_for(device, Settings.from_env(), holder="this vLLM worker")
        _worker = _WorkerCache(backend)
        lifecycle.on_exit(_worker.close)
    return _worker


def _min_chunk(layout: str) -> int | None:
    """``ELASTIKV_CHUNK`` for a per-layer plan (vLLM 0.26's layout), else None (the default chunk): the one rule for
    both plans of a worker, its capacity and its space. A page maps one chunk in every layer, and the driver's cost
    is per mapping, not per byte, so larger chunks map a request's KV in fewer calls (an 8B model: 32 mappings a
    page; 2 MiB chunks hold 512 tokens). Not for a block-outermost plan, whose flattened space sizes its pages
    differently (``kv_unified.py``)."""
    return Settings.from_env().min_chunk_bytes if layout == "per-layer" else None


def _block_outermost(layout: Any) -> bool:
    order: Any = getattr(layout, "value", None)
    return bool(order) and order[0] == 1


def _capacity(worker: Any) -> int:
    """The virtual capacity in bytes, rounded down so that vLLM's block count fills whole pages."""
    specs = worker.get_kv_cache_spec()
    pages = {int(s.page_size_bytes) for s in specs.values()}
    if len(pages) != 1:
        raise UnsupportedEngine(
            f"elastikv needs every KV cache layer to use one page size; this model has {sorted(pages)}. "
            "Run it without ELASTIKV=1."
        )
    page, layers = pages.pop(), len(specs)
    cache = _worker_backend(worker.device if hasattr(worker, "device") else torch.device("cpu"))
    gran, total = cache.backend.granularity, cache.backend.mem_info()[1]
    try:
        outermost = _block_outermost(worker.cache_config.get_resolved_kv_cache_layout())
    except (AttributeError, ValueError):
        outermost = False
    if outermost:  # a block is all layers side by side, padded to the specs' alignment
        align = 1
        for s in specs.values():
            getter = getattr(s, "get_block_stride_alignment", None)
            if getter is not None:
                a = int(getter())
                align = math.lcm(align, a)
        unit = -(-page * layers // align) * align
        # Pages of as many blocks as a layer's page fits in a granule (as the per-layer plan has). The space
        # kv_unified.py opens sees one flattened block and makes pages of fewer blocks, which divide these.
        plan = PagePlan.for_capacity(
            KVGeometry(1, (unit,), torch.uint8, buffers_per_layer=1),
            "interleaved",
            gran,
            capacity_bytes=total,
            target_blocks=max(1, gran // page),
        )
    else:  # one contiguous range per layer: a page is one chunk in each
        geometry = KVGeometry(layers, (page,), torch.uint8, buffers_per_layer=1)
        plan = PagePlan.for_capacity(geometry, "per-layer", gran, capacity_bytes=total,
                                    min_chunk_bytes=_min_chunk("per-layer"))  # fmt: skip
    capacity, block = plan.capacity_bytes, plan.geometry.group_bytes
    log.debug("capacity %s (%d blocks of %s)", format_bytes(capacity), plan.num_blocks, block)
    return capacity


def _wrap_determine_available_memory(original: Callable[..., int]) -> Callable[..., int]:
    def determine_available_memory(self: Any) -> int:
        # Run vLLM's own pass for what it does besides measuring (profiling, compiling, warming up), with a
        # 1-byte explicit request so that it neither sizes from free memory nor refuses a large size.
        cc = self.cache_config
        saved = cc.kv_cache_memory_bytes
        cc.kv_cache_memory_bytes = 1
        try:
            original(self)
        finally:
            cc.kv_cache_memory_bytes = saved
        capacity = _capacity(self)
        log.info(
            "elastikv: KV cache virtual capacity %s (the device's memory; mapped on demand)", format_bytes(capacity)
        )
        return capacity

    return determine_available_memory


def _wrap_initialize_from_config(original: Callable[..., None]) -> Callable[..., None]:
    def initialize_from_config(self: Any, kv_cache_config: Any) -> None:
        _real_allocation.worker = self
        try:
            original(self, kv_cache_config)
        finally:
            _real_allocation.worker = None

    return initialize_from_config


def this_worker() -> _WorkerCache | None:
    """This process's elastic KV cache, if it is a worker that has one."""
    return _worker


def real_allocation_worker() -> Any:
    """The vLLM worker whose ``initialize_from_config`` is running on this thread, or None (a profiling
    allocation, or not a worker): only that allocation is made elastic."""
    return getattr(_real_allocation, "worker", None)


def take_space(device: torch.device, make: Callable[[MemoryBackend], KVSpace]) -> KVSpace:
    """This worker's one KV space, made by ``make`` over its backend; a second one is refused."""
    cache = _worker_backend(device)
    if cache.space is not None:
        raise UnsupportedEngine("this worker already has an elastic KV cache; vLLM asked for a second one")
    cache.space = make(cache.backend)
    return cache.space


def open_space(backend: MemoryBackend, geometry: KVGeometry, layout: str, num_blocks: int) -> KVSpace:
    """The scratch-backed space for vLLM's plan: exactly ``num_blocks`` blocks (vLLM's block 0, its null block,
    mapped for good), which must fill whole pages."""
    plan = PagePlan.for_blocks(geometry, layout, backend.granularity, num_blocks=num_blocks, null_blocks=1,  # type: ignore[arg-type]
                               min_chunk_bytes=_min_chunk(layout))  # fmt: skip
    if plan.num_blocks != num_blocks:
        raise UnsupportedEngine(
            f"vLLM planned {num_blocks} blocks, not a whole number of {plan.blocks_per_page}-block pages; elastikv "
            "sizes the cache itself: do not pass --num-gpu-blocks-override with ELASTIKV=1"
        )
    return KVSpace(backend, geometry, plan=plan, scratch_backed=True)


def serve_pages(worker: Any) -> None:
    """Serve this worker's space to the engine core (after the views are made)."""
    cache = _worker
    assert cache is not None and cache.space is not None
    cache.rank = int(getattr(worker, "rank", 0) or 0)
    backend, space = cache.backend, cache.space
    facts = {"rank": cache.rank, "device_id": backend.device_id, "device_label": backend.device_label,
             "total_bytes": backend.mem_info()[1], "layout": space.layout}  # fmt: skip
    cache.server = PageServer(space, facts)
    log.info("elastikv: worker rank %d: %s; pages served at %s", cache.rank, space.describe(), cache.server.path)


def endpoint(_worker_obj: Any = None) -> dict[str, Any] | None:
    """This worker's page server facts (run in every worker through ``collective_rpc``), or None."""
    cache = _worker
    if cache is None or cache.server is None:
        return None
    facts = dict(cache.server.facts)
    facts["free_bytes"] = cache.backend.mem_info()[0]
    return facts


# -- the weights in the ledger (run in every worker through collective_rpc by the engine core) ----------------
_holding: Holding | None = None
_device = torch.device("cpu")
_weights = 0  # bytes of this rank's weights, measured once
_other = 0  # what this rank holds awake besides weights and KV (context, activations, graphs), measured at start


def _kv_mapped() -> int:
    """Bytes of KV this worker has mapped now (its pages; the page server maps them for the engine core)."""
    cache = _worker
    return cache.space.mapped_bytes if cache is not None and cache.space is not None else 0


def book_weights(worker_obj: Any, name: str) -> int:
    """Book this rank's weights and other memory in its device's ledger beside the engine's KV
    (``ELASTIKV_BOOK_WEIGHTS``; rank r > 0 as ``name.rankR``). Called once vLLM has profiled, made its KV cache
    and captured its CUDA graphs, so ``other`` (``memory/usage.py``: the driver's count of this process less
    weights and KV, plus the activation peak) is what serving holds. vLLM loads the weights before elastikv's
    instance exists, so a budget that cannot take them is logged, not refused (``Holding.book_held``): they are on
    the device already. Returns the bytes booked."""
    global _holding, _weights, _other, _device
    rank = int(getattr(worker_obj, "rank", 0) or 0)
    if _holding is None:
        _device = torch.device(getattr(worker_obj, "device", None) or "cpu")
        _holding = open_holding(_device, Settings.from_env(), name=name if rank == 0 else f"{name}.rank{rank}")
        if _holding is None:
            return 0
        runner = getattr(worker_obj, "model_runner", None)  # its storages exactly; else vLLM's own measure
        if runner is not None and hasattr(runner, "get_model"):
            _weights = weight_bytes(runner.get_model())
        _weights = _weights or int(getattr(runner, "model_memory_usage", 0) or 0)
        _other = other_bytes(_device, weights=_weights, kv=_kv_mapped())
        log.info("elastikv: rank %d holds %s of weights and %s of other memory besides KV", rank,
                 format_bytes(_weights), format_bytes(_other))  # fmt: skip
    return _weights + _other if _holding.book_held(weights=_weights, other=_other) else 0


def drop_weights(_worker_obj: Any = None) -> None:
    """After vLLM's sleep: the weights are off the device (level 1: in host memory; level 2: dropped); what the
    process still holds there (its context, graph pools) stays booked."""
    if _holding is not None:
        _holding.rest(resident_bytes(_device, kv=_kv_mapped()))


def rebook_weights(_worker_obj: Any = None) -> None:
    """Before vLLM's wake: ``LimitExceeded`` if the budget cannot take the weights and other memory back (the
    wake is refused; a router makes room first)."""
    if _holding is not None:
        _holding.book(weights=_weights, other=_other)
