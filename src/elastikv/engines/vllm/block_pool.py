"""vLLM adapter, the scheduler's block pool: vLLM's ``BlockPool`` with block ids from elastikv's allocator.

The engine core opens a :class:`VllmInstance` (``scheduler.py``) and hands it over through :data:`pending`; the
next ``ElasticBlockPool`` vLLM builds takes it. A pool built with none pending stays vLLM's own (static).

The logic is in :class:`ElasticBlockPoolMixin`, defined here. The class vLLM instantiates subclasses it and
vLLM's own ``BlockPool``, which can be imported only where vLLM is installed, so :func:`pool_class` makes it on
first use (this module imports without vLLM, as every elastikv module must).

Differences between vLLM releases absorbed here: ``KVCacheBlock.pool`` is absent (0.26), the pool itself (0.32,
0.33) or a weak reference to it (0.34), read through :func:`_owner`; ``BlockPool.free_blocks`` gained
``evict_first`` in 0.34 (accepted and passed on).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from elastikv.engines.patching import Target
from elastikv.errors import AllocationRefused, ElastikvError, UnsupportedEngine
from elastikv.instance import Booked
from elastikv.peer_pages import PeerPages

if TYPE_CHECKING:  # what the mixin extends (vLLM's own, where vLLM is installed)
    from vllm.v1.core.block_pool import BlockPool as _BlockPool

    from elastikv.allocator import BlockAllocator
else:  # at run time the mixin stands alone; pool_class() puts vLLM's class after it
    _BlockPool = object

log = logging.getLogger("elastikv")

# What the pool overrides or calls in vLLM's BlockPool and free queue, in every supported release (a part of
# scheduler.TARGETS).
TARGETS: tuple[Target, ...] = (
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


@dataclass
class VllmInstance(Booked):
    """The engine core's side: pages in the workers, the ledger row, the allocator."""

    pages: PeerPages = field(default=None)  # type: ignore[assignment]
    prefix_cache_blocks: int = 0

    def _release(self) -> None:
        self.pages.close()


pending: list[VllmInstance] = []  # made by _initialize_kv_caches (scheduler.py), taken by the next ElasticBlockPool


def _owner(block: Any) -> Any:
    """The pool a block belongs to, if vLLM says (0.26: never; 0.32-0.33: the pool; 0.34: a weak reference)."""
    pool = getattr(block, "pool", None)
    return pool() if isinstance(pool, weakref.ref) else pool


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


class ElasticBlockPoolMixin(_BlockPool):  # type: ignore[misc]
    """vLLM's BlockPool with block ids from elastikv's allocator.

    Who holds which free block: the allocator holds every block that holds no data (mapped or not);
    vLLM's ``free_block_queue`` holds only blocks with ``ref_cnt == 0`` that still hold data worth
    keeping (a cached prefix, or a block unpinned until reuse), in eviction order, and they stay allocated
    in the allocator (mapped) until evicted; ``_stash`` holds blocks secured for the admission under way.
    A block with ``ref_cnt > 0`` is owned by requests, as in vLLM.

    Free count: during an admission, exactly what is secured (stash + evictable queue); otherwise that plus
    what the allocator could still map within the limit.
    """

    # vLLM's own, bound by :func:`pool_class` where vLLM is imported
    _free_queue_class: Callable[[list[Any]], Any]  # kv_cache_utils.FreeKVCacheBlockQueue

    def __init__(self, num_gpu_blocks: int, enable_caching: bool, *args: Any, **kwargs: Any) -> None:
        super().__init__(num_gpu_blocks, enable_caching, *args, **kwargs)
        self.instance: VllmInstance | None = pending.pop() if pending else None
        self._stash: list[int] = []
        self.admitting = False
        self._all_free = False  # True only inside reset_prefix_cache, once nothing is in use
        self._extra = 0
        if self.instance is None:
            log.warning("elastikv: a vLLM BlockPool with no elastic cache behind it (left static)")
            return
        self._alloc: BlockAllocator = self.instance.allocator
        expected = self._alloc.num_blocks + self.instance.pages.null_blocks
        if num_gpu_blocks != expected:
            raise UnsupportedEngine(f"vLLM's scheduler has {num_gpu_blocks} blocks, the workers {expected}")
        for b in self.blocks:  # vLLM linked them all into its queue; ours starts empty
            b.prev_free_block = b.next_free_block = None
        self.free_block_queue = self._free_queue_class([])
        self._block_bytes = self._alloc.block_bytes

    # -- admission ----------------------------------------------------------------------------------------
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

    # -- vLLM's BlockPool interface -----------------------------------------------------------------------
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


@functools.cache
def pool_class() -> type:
    """``ElasticBlockPool``: the mixin over vLLM's own ``BlockPool``, made once vLLM is importable."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    class ElasticBlockPool(ElasticBlockPoolMixin, BlockPool):  # type: ignore[misc]
        __doc__ = ElasticBlockPoolMixin.__doc__
        _free_queue_class = FreeKVCacheBlockQueue

    return ElasticBlockPool
