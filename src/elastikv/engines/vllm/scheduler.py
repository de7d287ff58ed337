"""vLLM adapter, scheduler side (engine-core process), shared by every supported vLLM (0.26 to 0.34).

After vLLM initialises the KV caches, the engine core asks every worker for its page server (``collective_rpc``),
books an instance in the device's ledger and starts a :class:`~elastikv.allocator.BlockAllocator` over the
workers' pages (:class:`VllmInstance`). The scheduler's ``BlockPool`` is replaced by ``ElasticBlockPool``, which
takes block ids from that allocator. Admission is exact: while ``KVCacheManager.allocate_slots`` decides, the
blocks it counts on are secured first (mapped on every rank, booked in the ledger), so a refusal (limit, device
budget, driver out of memory) is a plain "not now" (vLLM queues or preempts) and never a failure inside an
allocation.

Differences between vLLM releases absorbed here (the KV-allocation side lives in ``vllm_kv_*.py``):
``KVCacheBlock.pool`` is absent (0.26), the pool itself (0.32, 0.33) or a weak reference to it (0.34), read
through :func:`_owner`; ``BlockPool.free_blocks`` gained ``evict_first`` in 0.34 (accepted and passed on).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elastikv import lifecycle
from elastikv.config import Settings, format_bytes
from elastikv.engines.patching import Target
from elastikv.engines.vllm import worker as vllm_worker
from elastikv.errors import AllocationRefused, ElastikvError, UnsupportedEngine
from elastikv.instance import Booked, DeviceFacts, book
from elastikv.peer_pages import PeerPages

log = logging.getLogger("elastikv")

# What this side patches or calls, in every supported release (checked before patching; see contract.py).
TARGETS: tuple[Target, ...] = (
    Target("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", ("self", "vllm_config")),
    Target("vllm.v1.engine.core", "EngineCore.collective_rpc", ("self", "method")),
    Target("vllm.v1.engine.core", "EngineCore.shutdown", ("self",)),
    Target("vllm.v1.engine.core", "EngineCore.sleep", ("self", "level")),
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


def install(patch: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    """Patch the engine core and the scheduler (every process; only the engine core uses them)."""
    patch("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", _wrap_initialize_kv_caches)
    patch("vllm.v1.engine.core", "EngineCore.shutdown", _wrap_shutdown)
    patch("vllm.v1.engine.core", "EngineCore.sleep", _wrap_sleep)
    patch("vllm.v1.core.kv_cache_coordinator", "BlockPool", lambda _orig: _pool_class())
    patch(
        "vllm.v1.core.kv_cache_coordinator",
        "KVCacheCoordinator.get_num_blocks_to_allocate",
        _wrap_get_num_blocks_to_allocate,
    )
    patch("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", _wrap_allocate_slots)


def _owner(block: Any) -> Any:
    """The pool a block belongs to, if vLLM says (0.26: never; 0.32-0.33: the pool; 0.34: a weak reference)."""
    pool = getattr(block, "pool", None)
    return pool() if isinstance(pool, weakref.ref) else pool


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
    worker = vllm_worker.this_worker()
    local = {worker.server.path: worker.server} if worker is not None and worker.server is not None else {}
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
    import vllm

    text = str(getattr(vllm, "__version__", "unknown"))
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
        endpoints = self.collective_rpc(vllm_worker.endpoint)
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


def _wrap_sleep(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's sleep (level >= 1) clears the prefix cache, so every block is back in the allocator; then the
    allocator goes idle: every empty page is unmapped and no reserve is kept until the next request allocates.
    (vLLM's own sleep offloads or drops the weights; the KV cache is elastikv's, not in vLLM's memory pool.)"""

    def sleep(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        level = int(kwargs.get("level", args[0] if args else 1))
        inst = getattr(self, "_elastikv", None)
        if inst is None or level < 1:
            return result
        if isinstance(result, concurrent.futures.Future):  # it sleeps once in-flight requests are done
            result.add_done_callback(lambda _done: inst.allocator.idle())
        else:
            inst.allocator.idle()
        return result

    return sleep


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


def _oldest(queue: Any, n: int) -> list[Any]:
    """The ``n`` blocks at the head (least recently used end) of vLLM's ``FreeKVCacheBlockQueue``, walked from
    its head sentinel (in every supported release) without visiting the rest."""
    head = getattr(queue, "fake_free_list_head", None)
    if head is None:  # a layout we have not seen: the whole queue, in order
        return list(queue.get_all_free_blocks())[:n]
    out: list[Any] = []
    block = head.next_free_block
    while block is not None and len(out) < n and block is not getattr(queue, "fake_free_list_tail", None):
        out.append(block)
        block = block.next_free_block
    return out


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

        def free_blocks(self, ordered_blocks: Any, *args: Any, **kwargs: Any) -> None:
            # *args/**kwargs: 0.34's evict_first, passed on to another pool's blocks; ours are ordered by
            # elastikv (page-emptying first) when the prefix cache is bounded.
            if self.instance is None:
                return super().free_blocks(ordered_blocks, *args, **kwargs)  # type: ignore[no-any-return]
            to_allocator: list[int] = []
            to_queue: list[Any] = []
            others: dict[Any, list[Any]] = {}
            for block in ordered_blocks:
                pool = _owner(block)
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
                pool.free_blocks(blocks, *args, **kwargs)
            self._bound_prefix_cache()

        def _bound_prefix_cache(self) -> None:
            """Evict cached blocks beyond ``ELASTIKV_PREFIX_CACHE``, and as many as mapped memory is above a
            lowered limit (``elastikv limit``: cached blocks would otherwise keep their pages mapped, and be
            reused in place, forever): page-emptying ones first, then the oldest."""
            assert self.instance is not None
            over = self.free_block_queue.num_free_blocks - self.instance.prefix_cache_blocks
            excess = self._alloc.over_limit_bytes()
            if excess > 0:
                over = max(over, min(self.free_block_queue.num_free_blocks, -(-excess // self._block_bytes)))
            if over <= 0:
                return
            # Blocks that empty a page go first, so memory really returns; then the least recently used. Only
            # the oldest few pages' worth are ordered: this runs on every free, and ordering the whole queue (a
            # few thousand blocks) cost ~1 ms a request, in the engine's step, at light load.
            queue = self.free_block_queue
            window = _oldest(queue, over + 2 * self._alloc.blocks_per_page)
            order = self._alloc.eviction_order(b.block_id for b in window)[:over]
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
