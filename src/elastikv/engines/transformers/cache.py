"""transformers adapter, the cache: ``ElasticCache`` and ``ElasticBlockManager`` over elastikv (transformers 5.17).

``ElasticCache`` replaces transformers' ``PagedAttentionCache`` (layout and null blocks: see the package's
docstring); its ``_block_manager`` is an ``ElasticBlockManager``, whose free, empty blocks are the
:class:`~elastikv.allocator.BlockAllocator`'s (:class:`_AllocatorQueue`).

The logic is in two mixins and a helper class defined here. The classes transformers instantiates subclass the
mixins and transformers' own classes, which can be imported only where transformers is installed, so
:func:`cache_class` makes them on first use (this module imports without transformers, as every elastikv module
must).

This module also keeps this process's state: the options :func:`~elastikv.engines.transformers.enable` was
given (:data:`options`) and every cache built and not yet closed (:func:`caches`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from elastikv.config import Settings
from elastikv.errors import AllocationRefused, UnsupportedEngine
from elastikv.instance import Instance, open_instance
from elastikv.space import KVGeometry

if TYPE_CHECKING:  # what the mixins extend (transformers' own, where transformers is installed)
    from transformers.generation.continuous_batching.cache import PagedAttentionCache as _PagedAttentionCache
    from transformers.generation.continuous_batching.cache_manager import BlockManager as _BlockManager

    from elastikv.allocator import BlockAllocator
else:  # at run time the mixins stand alone; cache_class() puts transformers' classes after them
    _PagedAttentionCache = _BlockManager = object

log = logging.getLogger("elastikv")

NULL_BLOCKS = 2  # read trash (zeros) and write trash
OPEN_RETRY_S = 0.25


@dataclass
class Options:
    """What :func:`~elastikv.engines.transformers.enable` was given; read by every ElasticCache built afterwards
    in this process."""

    name: str | None = None
    settings: Settings | None = None
    max_kv_tokens: int = 16384  # KV slots one batch may read (bounds the sdpa/eager attention mask)


options = Options()
_caches: list[Any] = []  # every ElasticCache built in this process, newest last (the engine reads its instance)


class _AllocatorQueue:
    """Stands in for the block manager's deque of uninitialized blocks, over the allocator."""

    def __init__(self, alloc: BlockAllocator) -> None:
        self.alloc = alloc
        self._taken: list[int] = []  # allocated by take(), popped next by transformers

    def take(self, n: int) -> bool:
        need = n - len(self._taken)
        if need > 0:
            try:
                self._taken += self.alloc.allocate(need)
            except AllocationRefused:
                return False
        return True

    def __len__(self) -> int:
        return len(self._taken) + int(self.alloc.available())

    def popleft(self) -> int:
        if not self._taken and not self.take(1):
            raise AllocationRefused("no block to hand out")
        return self._taken.pop(0)

    def append(self, block_id: int) -> None:
        self.alloc.free([block_id])

    def extend(self, block_ids: Iterable[int]) -> None:
        ids = list(block_ids)
        if ids:
            self.alloc.free(ids)

    def clear(self) -> None:
        if self._taken:
            self.alloc.free(self._taken)
            self._taken = []


class ElasticBlockManagerMixin(_BlockManager):  # type: ignore[misc]
    """transformers' block manager, its free blocks being elastikv's allocator.

    transformers keeps three kinds of block: in use (referenced by requests), *initialized* (free but holding
    a complete block of a cached prefix, in ``_init_block_ids``) and *uninitialized* (free, no data, in
    ``_uninit_block_ids``). Here the uninitialized ones are the allocator's (``_AllocatorQueue``): taking one
    allocates it, giving one back frees it (its page is unmapped once empty). Initialized blocks stay
    allocated, so mapped, up to ``cached_limit`` blocks; beyond that the ones whose eviction empties a page
    go first (:meth:`_bound_cache`), so memory really returns.
    """

    def __init__(self, instance: Instance, block_size: int, cached_limit: int) -> None:
        super().__init__(0, block_size, tp_on=False)
        self.alloc = instance.allocator
        self.num_blocks = instance.space.num_blocks
        self.cached_limit = cached_limit
        self._uninit_block_ids: _AllocatorQueue = _AllocatorQueue(self.alloc)  # type: ignore[assignment]

    def get_free_blocks(
        self, n_blocks: int, last_block_id: int | None, shareable: bool, group_id: int
    ) -> list[int] | None:
        if not self.has_enough_free_blocks(n_blocks):  # may turn cached blocks back into free ones
            return None
        if not self._uninit_block_ids.take(n_blocks):  # all or nothing, before transformers pops them
            return None
        return super().get_free_blocks(n_blocks, last_block_id, shareable, group_id)  # type: ignore[no-any-return]

    def free_blocks(self, blocks: list[int], shareable: bool) -> None:
        super().free_blocks(blocks, shareable)
        self._bound_cache()

    def _bound_cache(self) -> None:
        over = len(self._init_block_ids) - self.cached_limit
        if over <= 0:
            return
        order = self.alloc.eviction_order(self._init_block_ids)  # oldest first, page-emptying before
        for block_id in order[:over]:
            del self._init_block_ids[block_id]
            block = self._id_to_block.pop(block_id)
            self._hash_to_id.pop(block.hash, None)  # type: ignore[arg-type]  # None (never hashed): no entry
            self._uninit_block_ids.append(block_id)


class ElasticCacheMixin(_PagedAttentionCache):  # type: ignore[misc]
    """transformers' paged cache over an elastikv KVSpace (see the package's docstring)."""

    # bound by :func:`cache_class` where transformers is imported
    _block_manager_class: Callable[..., Any]  # ElasticBlockManager

    def __init__(
        self,
        config: Any,
        continuous_batching_config: Any,
        device: Any,
        distributed_helper: Any,
        tp_plan: Any,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        cb = continuous_batching_config
        if distributed_helper.tp_size > 1:
            raise UnsupportedEngine("elastikv's transformers engine runs on one device (no tensor parallelism)")
        cb.safety_margin = 0.0  # a margin of the *virtual* size would throttle every prefill
        if cb.max_batch_tokens is None:
            cb.max_batch_tokens = 256
        asked = cb.num_blocks
        cb.num_blocks = 1  # transformers builds a one-block cache; it is re-pointed below
        try:
            with _sizing_without_device_sync():
                super().__init__(config, cb, device, distributed_helper, tp_plan, dtype)
        finally:
            cb.num_blocks = asked
        if self.num_groups != 1 or self.num_sliding_attention_groups:
            raise UnsupportedEngine(
                "elastikv's transformers engine handles models whose layers are all full attention; "
                "this one has sliding-window layers"
            )
        bs, heads, dim, layers = self.block_size, self.num_key_value_heads, self.head_dim, len(self.key_cache)  # type: ignore[has-type]
        geometry = KVGeometry(1, (bs, layers, 2, heads, dim), dtype, buffers_per_layer=1)
        torch_device = torch.device(device)
        for old in _caches:  # a finished session's cache (generate_batch makes one per call): give it back
            old.elastic.close()
        _caches.clear()
        settings = options.settings or Settings.from_env()
        if torch_device.type == "cpu" and settings.backend == "auto":
            from dataclasses import replace

            settings = replace(settings, backend="host")
        self.elastic: Instance = _open_when_room(
            lambda: open_instance(
                geometry,
                engine="transformers",
                name=options.name,
                settings=settings,
                layout="interleaved",
                num_blocks=asked,
                null_blocks=NULL_BLOCKS,
            )
        )
        space = self.elastic.space
        n = space.num_blocks
        slots = space.raw.view(dtype).view(n * bs, layers, 2, heads, dim)
        self.key_cache = [slots[:, j, 0] for j in range(layers)]
        self.value_cache = [slots[:, j, 1] for j in range(layers)]
        for t in (*self.key_cache, *self.value_cache):
            torch._dynamo.mark_static_address(t)
        space.raw[: NULL_BLOCKS * space.geometry.group_bytes].zero_()  # the read trash must read zeros
        self.num_blocks = n
        self.num_pages = max(options.max_kv_tokens, cb.max_batch_tokens)  # the per-batch read budget
        self.cache_shape = tuple(self.key_cache[0].shape)  # type: ignore[assignment]
        self.read_trash_index = 0
        self.sentinel_index = 1
        self.write_trash_index = bs  # block 1
        block_bytes = space.geometry.group_bytes
        cached = settings.prefix_cache.resolve(self.elastic.ledger.total_bytes) // block_bytes
        self._block_manager = self._block_manager_class(self.elastic, bs, cached_limit=cached)
        self.waits = 0
        self.starved_since: float | None = None  # when running requests began to wait for memory
        _caches.append(self)

    def allocate_blocks(self, n_blocks: int, request_id: str, allocated_blocks: int) -> int | None:
        """As transformers', but a refusal after its free-count check (the device budget or the driver said
        no in between) is "not now" (None), not an error that fails every request. One layer group only
        (checked at start), so there is no partial allocation to undo."""
        if not self.will_allocation_be_successful(n_blocks, allocated_blocks):
            return None
        got = self.group_cache_managers[0].allocate_blocks(n_blocks, request_id, self._block_manager)
        return None if got is None else int(got)


@functools.cache
def cache_class() -> type:
    """``ElasticCache``: the mixins over transformers' own classes, made once transformers is importable."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.cache_manager import BlockManager

    class ElasticBlockManager(ElasticBlockManagerMixin, BlockManager):  # type: ignore[misc]
        __doc__ = ElasticBlockManagerMixin.__doc__

    class ElasticCache(ElasticCacheMixin, PagedAttentionCache):  # type: ignore[misc]
        __doc__ = ElasticCacheMixin.__doc__
        _block_manager_class = ElasticBlockManager

    return ElasticCache


_sizing_lock = threading.Lock()  # one cache at a time swaps transformers' sizing function


@contextlib.contextmanager
def _sizing_without_device_sync() -> Iterator[None]:
    """While transformers' paged cache is built, its free-memory figure without ``empty_cache`` and
    ``synchronize``. transformers sizes a cache from that figure (``PagedAttentionMemoryHandler``); elastikv sizes
    its own (a one-block cache, re-pointed at the instance's space), so the figure is unused, but the synchronize
    would make an early wake (``ELASTIKV_WAKE_EARLY``) wait here, on the batching thread, for every weight copy."""
    if not torch.cuda.is_available():  # nothing to wait for (transformers' CPU path neither synchronizes)
        yield
        return
    tf_cache: Any = importlib.import_module("transformers.generation.continuous_batching.cache")

    def breakdown() -> tuple[torch.device, int, int, int]:  # (device, total, reserved, allocated), as transformers'
        device = torch.device("cuda")
        free, total = torch.cuda.mem_get_info(device)  # cudaMemGetInfo: no wait on any stream
        return device, total, torch.cuda.memory_reserved(device), total - free

    with _sizing_lock:
        original = tf_cache.get_device_and_memory_breakdown
        tf_cache.get_device_and_memory_breakdown = breakdown
        try:
            yield
        finally:
            tf_cache.get_device_and_memory_breakdown = original


def _open_when_room(open_: Callable[[], Instance]) -> Instance:
    """Open the cache's instance, waiting while the device budget has no room even for its null blocks (other
    instances hold it all). This runs on transformers' batching thread: requests queue meanwhile, none is lost;
    raising instead would end that thread and drop every request."""
    waited_since = None
    while True:
        try:
            inst = open_()
        except AllocationRefused as exc:
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("elastikv: waiting for memory to open the KV cache: %s", exc)
            time.sleep(OPEN_RETRY_S)
            continue
        if waited_since is not None:
            log.info("elastikv: KV cache opened after waiting %.1f s for memory", time.monotonic() - waited_since)
        return inst


def latest_instance() -> Instance | None:
    """The elastic instance of the newest cache built in this process (the embedded engine has one)."""
    return _caches[-1].elastic if _caches else None


def caches() -> tuple[Any, ...]:
    """Every elastic cache built in this process and not yet closed, newest last."""
    return tuple(_caches)


def close_caches() -> None:
    """Close every elastic cache of this process (unmap every page, leave the ledger): its engine has stopped."""
    for cache in _caches:
        cache.elastic.close()
    _caches.clear()
